"""One run on several processes (torchrun, gloo on the CPU): the same result as one process, and it
stops, checkpoints and resumes like one."""

from __future__ import annotations

import signal

import torch

from qatbench.cli import _command, main
from qatbench.distributed import World
from qatbench.results import load_records
from tests.conftest import assert_same_training, exports
from tests.test_lifecycle import qatbench_process, stalled_process

MLP = ["--task", "mnist-mlp", "--recipe", "smoke", "--epochs", "5", "--no-download"]  # 4 steps of 128 an epoch


def _torchrun(argv, timeout=300):
    process = qatbench_process(*argv, "--nproc", "2")
    output = process.communicate(timeout=timeout)[0]
    return process.returncode, output


def test_two_gloo_ranks_train_what_one_process_trains(idx_root, isolated_data_env, tmp_path):
    argv = ["run", "--method", "fp", "ste", "parq", "fogzo", *MLP, "--bits", "2", "--data-root", str(idx_root)]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    code, output = _torchrun([*argv, "--out", str(tmp_path / "two")])
    assert code == 0 and "4 runs on 2 processes each, 4 ok" in output, output
    two = assert_same_training(tmp_path / "one", tmp_path / "two")
    assert all(r.environment["world_size"] == 2 and len(r.environment["devices"]) == 2 for r in two)
    assert all(r.spec["processes"] == 2 and r.command.endswith("--nproc 2") for r in two)  # re-creates the run


def test_two_gloo_ranks_train_learned_steps_as_one_process_does(idx_root, isolated_data_env, tmp_path):
    argv = ["run", "--method", "ste", "talr", *MLP, "--bits", "2", "--act-bits", "2", "--scale", "learned",
            "--data-root", str(idx_root)]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    code, output = _torchrun([*argv, "--out", str(tmp_path / "two")])
    assert code == 0, output
    assert_same_training(tmp_path / "one", tmp_path / "two")  # the first batch's activation steps: every rank's


def test_the_recorded_command_says_how_many_processes_ran():
    argv = ["run", "--method", "ste", "--task", "mnist-mlp"]
    assert _command(argv, World()) == "qatbench run --method ste --task mnist-mlp"
    assert _command(argv, World(1, 4, 1, 4)) == "qatbench run --method ste --task mnist-mlp --nproc 4"
    assert _command([*argv, "--nproc", "4"], World(1, 4, 1, 4)).count("--nproc") == 1
    assert _command(argv, World(5, 8, 1, 4)) == ("torchrun --nnodes=2 --nproc-per-node=4 -m qatbench run --method ste "
                                                "--task mnist-mlp")


def test_two_ranks_accumulating_micro_batches_train_what_one_process_trains(idx_root, isolated_data_env, tmp_path):
    argv = ["run", "--method", "fogzo", *MLP, "--bits", "2", "--data-root", str(idx_root)]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    code, output = _torchrun([*argv, "--out", str(tmp_path / "two"), "--micro-batch", "40"])  # 40 + 24 on each rank
    assert code == 0, output
    [record] = assert_same_training(tmp_path / "one", tmp_path / "two")
    assert record.environment["accumulation_steps"] == 2


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
    for name, tensor in exports(tmp_path / "reference")["parq"].items():
        assert torch.equal(tensor, exports(out)["parq"][name]), name
