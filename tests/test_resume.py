"""Issue: a killed run resumes exactly. Each case kills a real `qatbench run` process with SIGKILL in the
middle of an epoch, reruns the same command, and compares the result with an uninterrupted run: final
metric, per-epoch history and final weights must be bit-identical (on the CPU)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from qatbench.cli import main
from qatbench.registry import METHODS
from qatbench.results import load_records
from tests.conftest import make_cifar_batches, make_image_folder, write_corpus
from tests.test_lifecycle import stalled_process

MLP = ["--task", "mnist-mlp", "--recipe", "smoke", "--epochs", "3", "--batch-size", "16"]  # 20 steps an epoch


def _finish(argv: list[str], out: Path) -> tuple:
    """Run to the end in this process; the record and the last checkpoint (kept) of the one run in `out`."""
    assert main([*argv, "--out", str(out), "--keep-checkpoints", "--no-download"]) == 0
    [record] = load_records([out])
    [kept] = out.rglob("*.ckpt")
    return record, torch.load(kept, weights_only=True)


def _assert_same_run(resumed, reference) -> None:
    (record, kept), (expected, expected_kept) = resumed, reference
    assert record.run_id == expected.run_id and record.status == expected.status == "ok"
    assert record.metric == expected.metric and record.best_epoch_metric == expected.best_epoch_metric
    assert record.history == expected.history
    assert record.exactness == expected.exactness
    for name, tensor in expected_kept["model"].items():
        assert torch.equal(kept["model"][name], tensor), name
    assert len(record.resumed) == 1 and not expected.resumed
    timing = record.timing  # the killed process's time counts: the run's clock spans both processes
    assert timing["earlier_processes_s"] > 0 and timing["total_s"] >= timing["train_s"] + timing["eval_s"]


def _kill_and_resume(argv: list[str], step: int, tmp_path: Path):
    """Kill the run before its optimizer step `step` + 1 (checkpoints after every step), then finish it."""
    out = tmp_path / "killed"
    marker = tmp_path / "stalled"
    process = stalled_process([*argv, "--out", str(out), "--no-download", "--checkpoint-minutes", "0"], step, marker)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert list(out.rglob("*.ckpt")) and not list(out.rglob("*.json"))  # killed: no record, a checkpoint
    resumed = _finish(argv, out)
    assert resumed[0].resumed[0]["step"] == step  # it continued after the last step the killed process took
    return resumed


QUANT_PERIOD = ("--method-arg", "quant_period=3")  # level refreshes on both sides of the kill
ANNEAL = ("--method-arg", "anneal_end=0.9")  # step 54: the hard-quantized end is reached after the resume


EXTRA = {  # what makes a method's resume interesting: its schedule or level refresh crosses the kill
    "ste": QUANT_PERIOD, "binaryrelax": (*QUANT_PERIOD, *ANNEAL), "parq": (*QUANT_PERIOD, *ANNEAL),
    "fogzo": QUANT_PERIOD, "nspsa": (*QUANT_PERIOD, "--lr", "0.001"),
}
CASES = [(name, EXTRA.get(name, ())) for name in METHODS.names()] + [  # every registered method, and AProx,
    ("parq", ("--method-arg", "slope_schedule=aprox", "--method-arg", "quant_shrink=true", "--lr", "0.1")),
    ("ste", ("--scale", "learned", "--act-bits", "2")),  # LSQ: learned steps of weights and activations
    ("talr", ("--scale", "learned", "--act-bits", "2"))]  # TALR's own setting


@pytest.mark.parametrize("method, extra", CASES, ids=[*METHODS.names(), "parq-aprox", "lsq-w2a2", "talr-w2a2"])
def test_every_method_resumes_bit_identically_after_sigkill(method, extra, idx_root, isolated_data_env, tmp_path):
    argv = ["run", "--method", method, *MLP, "--data-root", str(idx_root), *extra]
    if METHODS.get(method).quantizes:
        argv += ["--bits", "2"]
    reference = _finish(argv, tmp_path / "reference")
    _assert_same_run(_kill_and_resume(argv, 45, tmp_path), reference)


def test_cifar_resumes_bit_identically(isolated_data_env, tmp_path):
    root = make_cifar_batches(tmp_path / "cifar", per_batch=40)  # 200 images: 6 steps of 32 an epoch
    argv = ["run", "--method", "fogzo", "--task", "cifar10-resnet20", "--bits", "2", "--recipe", "smoke",
            "--epochs", "2", "--data-root", str(root)]
    reference = _finish(argv, tmp_path / "reference")
    _assert_same_run(_kill_and_resume(argv, 8, tmp_path), reference)


@pytest.mark.parametrize("step", [9, 6], ids=["mid-epoch", "epoch-boundary"])
def test_image_folder_resumes_bit_identically(step, isolated_data_env, tmp_path):
    root = make_image_folder(tmp_path / "imagenet", classes=3, per_class_train=8, size=36)  # 6 steps of 4
    argv = ["run", "--method", "ste", "--task", "imagenet-resnet18", "--bits", "4", "--recipe", "smoke",
            "--epochs", "2", "--batch-size", "4", "--data-root", str(root), "--task-arg", "num_classes=3",
            "--task-arg", "image_size=32", "--task-arg", "workers=0"]
    reference = _finish(argv, tmp_path / "reference")
    _assert_same_run(_kill_and_resume(argv, step, tmp_path), reference)


def test_a_run_killed_between_epochs_resumes_with_a_fresh_epoch(idx_root, isolated_data_env, tmp_path):
    argv = ["run", "--method", "ste", "--bits", "2", *MLP, "--data-root", str(idx_root)]
    reference = _finish(argv, tmp_path / "reference")
    _assert_same_run(_kill_and_resume(argv, 40, tmp_path), reference)  # the end of the second epoch


def test_language_model_resumes_bit_identically(isolated_data_env, tmp_path):
    pytest.importorskip("transformers")
    corpus = write_corpus(tmp_path / "corpus.txt", sentences=300)
    argv = ["run", "--method", "parq", "--task", "llama-20m", "--bits", "4", "--recipe", "smoke", "--epochs", "2",
            "--batch-size", "4", "--data-root", str(corpus), "--task-arg", "seq_len=32",
            "--task-arg", "steps_per_epoch=5"]
    reference = _finish(argv, tmp_path / "reference")
    _assert_same_run(_kill_and_resume(argv, 7, tmp_path), reference)


def _flip_a_bit_of_the_largest_tensor(path: Path) -> None:
    """Flip one bit in the middle of the checkpoint's largest tensor, on disk (torch stores tensors uncompressed
    in its zip file), as a failing disk or a bad copy would."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        entry = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", raw[entry.header_offset + 26: entry.header_offset + 30])
    start = entry.header_offset + 30 + name_length + extra_length
    raw[start + entry.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def _killed_with_checkpoint(argv: list[str], tmp_path: Path) -> Path:
    out = tmp_path / "killed"
    process = stalled_process([*argv, "--out", str(out), "--no-download", "--checkpoint-minutes", "0"], 45,
                              tmp_path / "stalled")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    [checkpoint] = out.rglob("*.ckpt")
    return checkpoint


def test_a_damaged_checkpoint_is_refused_and_the_run_starts_over(idx_root, isolated_data_env, tmp_path, capsys):
    argv = ["run", "--method", "parq", "--bits", "2", *MLP, "--data-root", str(idx_root)]
    reference = _finish(argv, tmp_path / "reference")
    checkpoint = _killed_with_checkpoint(argv, tmp_path)
    _flip_a_bit_of_the_largest_tensor(checkpoint)
    capsys.readouterr()
    record, kept = _finish(argv, checkpoint.parent.parent)
    assert "does not match its digest: the file is damaged; starting over" in capsys.readouterr().out
    assert not record.resumed and record.metric == reference[0].metric and record.history == reference[0].history


def test_a_checkpoint_missing_parts_is_refused_and_the_run_starts_over(idx_root, isolated_data_env, tmp_path, capsys):
    from qatbench import checkpoint as checkpoints

    argv = ["run", "--method", "talr", "--bits", "2", *MLP, "--data-root", str(idx_root)]
    reference = _finish(argv, tmp_path / "reference")
    path = _killed_with_checkpoint(argv, tmp_path)
    payload = torch.load(path, weights_only=True)
    del payload["digest"], payload["method"]["step_size"]  # crafted: a valid digest over a checkpoint that lacks parts
    torch.save({**payload, "digest": checkpoints.digest(payload)}, path)
    capsys.readouterr()
    record, kept = _finish(argv, path.parent.parent)
    assert "does not fit this run (KeyError: 'step_size'); starting over" in capsys.readouterr().out
    assert not record.resumed and record.metric == reference[0].metric and record.history == reference[0].history
    again = _finish(argv, path.parent.parent)  # and later runs are not stuck on it
    assert again[0].metric == reference[0].metric
