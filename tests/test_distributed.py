"""One run on several processes (torchrun, gloo on the CPU): the same result as one process, and it
stops, checkpoints and resumes like one."""

from __future__ import annotations

import signal

import pytest
import torch
from safetensors import safe_open

from qatbench.cli import main
from qatbench.results import load_records
from tests.test_lifecycle import qatbench_process, stalled_process

MLP = ["--task", "mnist-mlp", "--recipe", "smoke", "--epochs", "5", "--no-download"]  # 4 steps of 128 an epoch


def _exports(out):
    tensors = {}
    for record in load_records([out]):
        with safe_open(str(out / record.task / record.export["file"]), "pt") as f:
            tensors[record.method] = {k: f.get_tensor(k) for k in f.keys()}
    return tensors


def _torchrun(argv, timeout=300):
    process = qatbench_process(*argv, "--nproc", "2")
    output = process.communicate(timeout=timeout)[0]
    return process.returncode, output


def test_two_gloo_ranks_train_what_one_process_trains(idx_root, isolated_data_env, tmp_path):
    argv = ["run", "--method", "fp", "ste", "parq", "fogzo", *MLP, "--bits", "2", "--data-root", str(idx_root)]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    code, output = _torchrun([*argv, "--out", str(tmp_path / "two")])
    assert code == 0 and "4 runs on 2 processes each, 4 ok" in output, output
    one, two = load_records([tmp_path / "one"]), load_records([tmp_path / "two"])
    assert {r.run_id for r in one} == {r.run_id for r in two}  # the world size is not part of a run's identity
    for a, b in zip(sorted(one, key=lambda r: r.method), sorted(two, key=lambda r: r.method)):
        assert b.environment["world_size"] == 2 and len(b.environment["devices"]) == 2
        assert a.metric == b.metric and a.history[-1]["top1"] == b.history[-1]["top1"], a.method
        assert [h["train_loss"] for h in a.history] == pytest.approx([h["train_loss"] for h in b.history], abs=1e-5)
    exports_one, exports_two = _exports(tmp_path / "one"), _exports(tmp_path / "two")
    for method, tensors in exports_one.items():
        for name, tensor in tensors.items():
            if name.endswith(".indices"):  # the 20 steps ended on the same level of every weight
                assert torch.equal(tensor, exports_two[method][name]), (method, name)
            else:
                torch.testing.assert_close(tensor, exports_two[method][name], rtol=0, atol=1e-5)


def test_two_ranks_stop_on_sigterm_checkpoint_and_resume_to_the_same_result(idx_root, isolated_data_env, tmp_path):
    argv = ["run", "--method", "parq", *MLP, "--epochs", "8", "--bits", "2", "--data-root", str(idx_root)]
    code, output = _torchrun([*argv, "--out", str(tmp_path / "reference")])
    assert code == 0, output
    out = tmp_path / "stopped"
    marker = tmp_path / "stalled"
    process = stalled_process([*argv, "--out", str(out), "--nproc", "2"], 10, marker)
    process.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks
    marker.with_name("stalled.release").touch()
    output = process.communicate(timeout=120)[0]
    [record] = load_records([out])
    # the ranks agree to stop where they next compare notes (every 20 steps, and at each epoch's end: step 12)
    assert record.status == "interrupted" and "stopped by SIGTERM at step 12" in record.message, output
    assert list(out.rglob("*.ckpt"))  # written by rank 0
    code, output = _torchrun([*argv, "--out", str(out)])
    assert code == 0 and "resumed from" in output and "at step 12" in output, output
    [reference], [resumed] = load_records([tmp_path / "reference"]), load_records([out])
    assert resumed.metric == reference.metric and resumed.history == reference.history
    for name, tensor in _exports(tmp_path / "reference")["parq"].items():
        assert torch.equal(tensor, _exports(out)["parq"][name]), name
