"""One run sharded with FSDP2 (`--fsdp`; 2 gloo ranks on the CPU, 2 NCCL ranks where there are 2 GPUs): what DDP
on as many ranks trains, what one process trains up to float reassociation, and it stops, checkpoints and resumes
like any run."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

from qatbench.cli import main
from qatbench.distributed import World
from qatbench.errors import QatbenchError
from qatbench.flat import FlatLayout
from qatbench.quant import Quantizer, QuantizerConfig
from qatbench.sharding import shard_model, whole_level_tables
from qatbench.results import load_records
from tests.conftest import assert_same_experiments, exports, write_corpus
from tests.test_distributed import _torchrun
from tests.test_lifecycle import stalled_process

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="the llama tasks need transformers (pip install 'qatbench[llm]')")

LLAMA = ["--task", "llama-20m", "--recipe", "smoke", "--batch-size", "4", "--task-arg", "seq_len=32",
         "--task-arg", "val_fraction=0.05", "--no-download", "--progress-seconds", "0",
         *[arg for option in ("hidden=64", "layers=2", "heads=2", "intermediate=128") for arg in ("--task-arg", option)]]
"""llama-20m's code path at a tiny size (task options): 2 decoder layers, the FSDP units, of width 64."""


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus.txt", sentences=400)


def _train(out: Path, argv: list[str], ranks: int = 1) -> Path:
    """`qatbench ARGV --out OUT` in this process, or on 2 ranks (torchrun); OUT."""
    if ranks == 1:
        assert main([*argv, "--out", str(out)]) == 0
    else:
        code, output = _torchrun([*argv, "--out", str(out)])
        assert code == 0, output
    return out


def _compare(reference: Path, other: Path, metric_rel: float, weight_atol: float, changed_share: float | None) -> list:
    """The runs under `other` are those under `reference` (same ids), with metrics within `metric_rel`, weights
    (and level tables) within `weight_atol` and, unless `changed_share` is None, at most that share of the packed
    level indices' bytes different (0: every quantized weight on the same level); the records of `other`."""
    one, two = load_records([reference]), load_records([other])
    assert_same_experiments(one, two)
    for a, b in zip(sorted(one, key=lambda r: r.method), sorted(two, key=lambda r: r.method)):
        assert b.status == "ok" and b.exactness["passed"] is not False, b.message
        assert b.metric == pytest.approx(a.metric, rel=metric_rel), a.method
    exports_one, exports_two = exports(reference), exports(other)
    for method, tensors in exports_one.items():
        for name, tensor in tensors.items():
            if name.endswith(".indices"):
                changed = (tensor != exports_two[method][name]).float().mean().item()
                assert changed_share is None or changed <= changed_share, (method, name, changed)
            else:
                torch.testing.assert_close(tensor, exports_two[method][name], rtol=0, atol=weight_atol)
    return two


def _exact_weights() -> list[torch.Tensor]:
    """Weights that are multiples of 1/64, so that their sums are exact in any order (LSBQ's later residuals are
    not); 3 rows split 2 + 1."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(-64, 65, shape, generator=generator).float() / 64 for shape in ((6, 5), (3, 4), (4, 7))]


CONFIGS = [QuantizerConfig(2, scheme, granularity) for scheme in ("uniform", "lsbq") for granularity in ("channel", "tensor")]


def _levels_of_shards(rank: int, world: int, port: int, out: Path) -> None:
    """On rank `rank`, for each of CONFIGS: the levels of its dim-0 chunks of `_exact_weights()` (FSDP's shards),
    whole again."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    shards = [w.chunk(world)[rank] for w in _exact_weights()]
    flat = torch.cat([shard.reshape(-1) for shard in shards])
    results = []
    for config in CONFIGS:
        layout = FlatLayout(shards, config.granularity, split=True)
        levels = Quantizer(config, layout).levels(flat)
        tables = whole_level_tables(layout.table_views(levels.table), rows_span_ranks=config.granularity == "tensor")
        results.append({"tables": tables, "sizes": layout.tensor_sizes, "sums": layout.tensor_reduce(flat)})
    torch.save(results, out / f"{rank}.pt")
    dist.destroy_process_group()


def test_levels_of_shards_reduced_over_ranks_are_the_unsharded_levels(tmp_path):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    torch.multiprocessing.spawn(_levels_of_shards, args=(2, port, tmp_path), nprocs=2)
    weights = _exact_weights()
    flat = torch.cat([w.reshape(-1) for w in weights])
    for rank in range(2):
        for config, result in zip(CONFIGS, torch.load(tmp_path / f"{rank}.pt", weights_only=True)):
            layout = FlatLayout(weights, config.granularity)
            expected = layout.table_views(Quantizer(config, layout).levels(flat).table)
            for table, whole in zip(result["tables"], expected):
                if config == QuantizerConfig(2, "lsbq", "tensor"):  # sums of inexact residuals, in another order
                    torch.testing.assert_close(table, whole, rtol=1e-6, atol=0)
                else:  # a row on one rank, or sums of exact values: bit for bit
                    assert torch.equal(table, whole), (rank, config, table, whole)
            assert result["sizes"].tolist() == [30, 12, 28]
            assert torch.equal(result["sums"], layout.tensor_reduce(flat))


DEVICES = [pytest.param([], id="cpu-gloo"),
           pytest.param(["--device", "cuda", "--precision", "fp32", "--no-tf32"], id="cuda-nccl",
                        marks=[pytest.mark.cuda, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL ranks need 2 CUDA devices")])]


@needs_transformers
@pytest.mark.parametrize("device", DEVICES)
def test_fsdp_trains_what_ddp_trains_on_as_many_ranks_per_channel(device, corpus, isolated_data_env, tmp_path):
    argv = ["run", "--method", "fp", "rtn", "binaryrelax", "parq", "talr", *LLAMA, "--bits", "2", "--epochs", "2",
            "--task-arg", "steps_per_epoch=3", "--data-root", str(corpus), *device]
    one = _train(tmp_path / "one", argv)
    ddp = _train(tmp_path / "ddp", argv, ranks=2)
    fsdp = _train(tmp_path / "fsdp", [*argv, "--fsdp"], ranks=2)
    sharded = _compare(ddp, fsdp, metric_rel=1e-6, weight_atol=1e-6, changed_share=0)
    _compare(one, fsdp, metric_rel=1e-5, weight_atol=1e-4, changed_share=None)  # a batch split in two: reassociated
    replicated = {r.method: r for r in load_records([ddp])}
    for record in sharded:
        assert record.environment["fsdp"] is True and record.environment["world_size"] == 2
        state, whole = record.memory["state_bytes"], replicated[record.method].memory["state_bytes"]
        assert state["parameters"] < 0.6 * whole["parameters"] and state["optimizer"] < 0.6 * whole["optimizer"]
        last, reference = record.history[-1], replicated[record.method].history[-1]
        assert last["distance_to_levels"] == pytest.approx(reference["distance_to_levels"], rel=1e-5)


@needs_transformers
def test_fsdp_per_tensor_lsbq_levels_reduce_over_the_ranks_and_micro_batches_accumulate(
        corpus, isolated_data_env, tmp_path):
    argv = ["run", "--method", "parq", *LLAMA, "--bits", "2", "--granularity", "tensor", "--quantizer", "lsbq",
            "--task-arg", "steps_per_epoch=4", "--micro-batch", "1", "--data-root", str(corpus)]
    ddp = _train(tmp_path / "ddp", argv, ranks=2)
    fsdp = _train(tmp_path / "fsdp", [*argv, "--fsdp"], ranks=2)
    # a tensor's statistics are sums of its two shards' sums (fp32, reassociated: levels ~1e-5 relative apart)
    [record] = _compare(ddp, fsdp, metric_rel=1e-4, weight_atol=1e-5, changed_share=1e-4)
    assert record.environment["accumulation_steps"] == 2
    for name, tensor in exports(fsdp)["parq"].items():  # one table per tensor, as unsharded
        if name.endswith(".levels"):
            assert tensor.shape == (1, 4), name


@needs_transformers
def test_fsdp_ranks_stop_checkpoint_their_shards_and_resume_to_the_same_result(corpus, isolated_data_env, tmp_path):
    argv = ["run", "--method", "parq", *LLAMA, "--bits", "2", "--epochs", "1", "--task-arg", "steps_per_epoch=22",
            "--data-root", str(corpus), "--fsdp"]
    reference = _train(tmp_path / "reference", argv, ranks=2)
    out, marker = tmp_path / "stopped", tmp_path / "stalled"
    process = stalled_process([*argv, "--out", str(out), "--nproc", "2"], 5, marker)
    process.send_signal(signal.SIGTERM)
    marker.with_name("stalled.release").touch()
    output = process.communicate(timeout=300)[0]
    [stopped] = load_records([out])
    assert stopped.status == "interrupted" and "at step 20" in stopped.message, output  # inside the first epoch
    code, output = _torchrun([*argv, "--out", str(out)])
    assert code == 0 and "resumed from" in output and "at step 20" in output, output
    [expected], [resumed] = load_records([reference]), load_records([out])
    assert resumed.metric == expected.metric and resumed.history == expected.history
    for name, tensor in exports(reference)["parq"].items():
        assert torch.equal(tensor, exports(out)["parq"][name]), name


@needs_transformers
@pytest.mark.parametrize("extra, message", [
    (["--method", "fogzo", "--task", "llama-20m"], "--fsdp: method 'fogzo' cannot train sharded parameters with "
                                                   "channel granularity; methods that can: binaryrelax, fp, parq, rtn, "
                                                   "ste, talr"),
    (["--method", "nspsa", "--task", "llama-20m", "--granularity", "tensor"], "method 'nspsa' cannot train sharded"),
    (["--method", "ste", "--task", "mnist-mlp"], "--fsdp: task 'mnist-mlp' cannot be sharded; tasks that can: "
                                                 "llama-130m, llama-1m, llama-20m, llama-300m, llama-60m"),
    (["--method", "ste", "--task", "llama-20m", "--compile", "default"], "--fsdp with --compile default is not "
                                                                         "supported yet; valid choice: --compile none"),
])
def test_what_cannot_be_sharded_is_a_one_line_error(extra, message, tmp_path, capsys):
    code = main(["run", *extra, "--bits", "2", "--fsdp", "--out", str(tmp_path), "--no-download"])
    error = capsys.readouterr().err
    assert code == 2 and message in error and len(error.strip().splitlines()) == 1, error


@needs_transformers
@pytest.mark.parametrize("launch", [[], ["--executor", "local", "--workers", "2"]])
def test_fsdp_on_one_process_says_how_to_start_several(launch, corpus, isolated_data_env, tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("task: llama-20m\nrecipe: smoke\nbits: [2]\nfsdp: true\nmethods: {ste: {}}\n")
    code = main(["sweep", str(sweep), *launch, "--data-root", str(corpus), "--no-download", "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert code == 2 and "--fsdp shards a run over its processes" in error and "--gpus-per-run N" in error, error
    assert not list(tmp_path.rglob("*.json"))


@pytest.mark.parametrize("shape, world, message", [
    ((8,), 2, "is not a matrix"),
    ((5, 3), 4, "would leave some of the 4 processes without a row"),  # FSDP's chunks of 5 rows: 2, 2, 1, 0
])
def test_a_quantized_tensor_that_shards_badly_is_named_before_sharding(shape, world, message):
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.zeros(shape))
    with pytest.raises(QatbenchError, match=message):
        shard_model(model, [], ["weight"], World(0, world, 0), torch.device("cpu"))
