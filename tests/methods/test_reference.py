"""qatbench's STE, BinaryRelax and PARQ against the PARQ authors' reference implementation (`torchao.prototype.parq`,
wrapped as `torchao-ste`, `torchao-binaryrelax`, `torchao-parq`).

In float64 the 200-step trajectories of the model's weights are the reference's to 1e-9 (measured: most bit for
bit, none more than 1.2e-11 apart: the level statistics, level sums and prox arithmetic are the reference's), on the MLP's and ResNet-20's tensors, uniform
and LSBQ levels, per tensor and per channel, 1 to 4 bits and ternary, PARQ before and after its annealing starts and
with AProx's shrinkage. Bit for bit matters: near the end of PARQ's annealing the map's slope 1/rho (about 1000)
amplifies any rounding difference at every step. One documented difference: from 3 bits the reference's greedy LSBQ
hard-quantizes at its refresh steps to the greedy expansion, not to the nearest level (`nearest_lsbq`). In float32
every map (the levels, hard quantization, BinaryRelax's mix, PARQ's prox) is within 1e-6 of the reference's (levels
relative to their row's largest). Skipped, with its reason, only where torchao cannot be installed."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao.prototype.parq", reason="the reference (torchao) is not installed: pip install -e '.[ref]'")

from qatbench.params import build_config  # noqa: E402
from qatbench.quant import TERNARY, Quantizer, QuantizerConfig, hard_quantize  # noqa: E402
from qatbench.flat import FlatLayout  # noqa: E402
from qatbench.registry import METHODS  # noqa: E402

SHAPES = {"mlp": [(10, 784), (10, 10)],  # FOGZO's 784-10-10
          "resnet20": [(16, 3, 3, 3), (16, 16, 3, 3), (32, 16, 3, 3), (64, 64, 3, 3), (10, 64)]}  # a subset
STEPS = 200
BITS = [1, 2, 3, 4, TERNARY]


def _pair(name: str, shapes, config: QuantizerConfig, dtype: torch.dtype, device: str = "cpu", **method_args):
    """qatbench's method and the reference's, each on its own copy of the same weights and an SGD optimizer."""
    generator = torch.Generator().manual_seed(0)
    weights = [(torch.randn(shape, generator=generator, dtype=dtype) * 0.1).to(device) for shape in shapes]
    methods, params = [], []
    for method_name in (name, f"torchao-{name}"):
        copies = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = torch.optim.SGD([{"params": copies, "quant": True}], lr=0.05, momentum=0.9, weight_decay=1e-4)
        cls = METHODS.get(method_name)
        methods.append(cls(build_config(cls.Config, method_args, method_name), optimizer, config, STEPS,
                           torch.Generator()))
        params.append(copies)
    return methods, params


@pytest.fixture
def nearest_lsbq(monkeypatch):
    """The reference's greedy LSBQ with its quantized tensor `q` made the nearest of its levels.

    At its refresh steps the reference hard-quantizes to the greedy expansion `q = sum_j v_j sign(r_{j-1})`, at every
    other step to the nearest level of the same set; from 3 bits on the two differ where `v_j < sum_{k>j} v_k`
    (`test_reference_greedy_lsbq_is_not_the_nearest_level`). qatbench projects to the nearest level at every step
    (BinaryConnect's and PARQ's Q(w) = argmin_{q in Q} |w - q|), so the trajectories are compared with the
    reference's projection made the same at refresh steps; the levels are the reference's own."""
    from torchao.prototype.parq import LSBQuantizer, ProxHardQuant

    greedy = LSBQuantizer.quantize_greedy

    def nearest(p, b, dim=None):
        _, levels = greedy(p, b, dim=dim)
        q = p.detach().clone()
        ProxHardQuant().apply_(q, None, levels, 0, dim=dim)
        return q, levels

    monkeypatch.setattr(LSBQuantizer, "quantize_greedy", staticmethod(nearest))


@pytest.fixture
def float64_default():
    """The reference keeps its levels in tensors of the default dtype (`torch.empty`): float64 for these tests."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _trajectories_agree(name: str, model: str, config: QuantizerConfig, device: str = "cpu", finalize: bool = False,
                        **method_args) -> float:
    """The largest difference between the two methods' model weights over STEPS steps of the same gradient field
    `grad L(p) = p - target + noise_t` (the same function of the weights for both)."""
    (ours, theirs), (mine, reference) = _pair(name, SHAPES[model], config, torch.float64, device, **method_args)
    generator = torch.Generator().manual_seed(1)
    targets = [(torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.1).to(device) for p in mine]
    worst = 0.0
    for _ in range(STEPS):
        noise = [(torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.05).to(device) for p in mine]
        for params, method in ((mine, ours), (reference, theirs)):
            for p, target, n in zip(params, targets, noise):
                p.grad = p.detach() - target + n
            method.step()
            method.zero_grad()
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(mine, reference)))
    if finalize:  # the exported model: both hard-quantize their last latent weights (w / gamma with quant_shrink)
        ours.finalize()
        theirs.finalize()
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(mine, reference)))
        tables = zip(ours.level_tables(), theirs.level_tables())
        worst = max(worst, max((a.reshape(b.shape) - b).abs().max().item() for a, b in tables))
    return worst


CONFIGS = [QuantizerConfig(bits, scheme, granularity) for scheme in ("uniform", "lsbq")
           for granularity in ("tensor", "channel") for bits in BITS]


def _id(config: QuantizerConfig) -> str:
    return f"{config.scheme}-{config.granularity}-b{config.bits or 'T'}"


@pytest.mark.parametrize("model", SHAPES)
@pytest.mark.parametrize("config", CONFIGS, ids=_id)
@pytest.mark.parametrize("name, args", [
    ("ste", {}),
    ("binaryrelax", {"anneal_start": 0.1, "anneal_end": 0.6}),
    ("parq", {"anneal_start": 0.0, "anneal_end": 0.75}),
    ("parq", {"anneal_start": 0.25, "anneal_end": 0.75, "steepness": 20}),  # no map before anneal_start, then one
], ids=["ste", "binaryrelax", "parq", "parq-late"])
def test_float64_trajectories_are_the_references(name, args, config, model, request, float64_default):
    if config.scheme == "lsbq" and config.bits >= 3:
        request.getfixturevalue("nearest_lsbq")
    assert _trajectories_agree(name, model, config, **args) <= 1e-9


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", [QuantizerConfig(2, "uniform", "channel"), QuantizerConfig(3, "lsbq", "tensor")],
                         ids=_id)
@pytest.mark.parametrize("name, args", [("ste", {}), ("parq", {"anneal_start": 0.0, "anneal_end": 0.75})])
def test_float64_trajectories_are_the_references_on_cuda(name, args, config, float64_default, nearest_lsbq):
    assert _trajectories_agree(name, "resnet20", config, "cuda", **args) <= 1e-9


@pytest.mark.parametrize("config", [QuantizerConfig(2, "uniform", "channel"), QuantizerConfig(2, "lsbq", "tensor")],
                         ids=_id)
def test_parq_with_aprox_shrinkage_is_the_references(config, float64_default):
    assert _trajectories_agree("parq", "mlp", config, finalize=True, quant_shrink=True, warmup=20) <= 1e-9


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_float32_maps_are_within_1e6_of_the_references(config):
    from torchao.prototype.parq import LSBQuantizer, ProxBinaryRelax, ProxHardQuant, ProxPARQ, TernaryUnifQuantizer
    from torchao.prototype.parq import UnifQuantizer

    from qatbench.methods.parq import parq_prox

    generator = torch.Generator().manual_seed(2)
    rows = torch.randn(64, 300, generator=generator) * torch.logspace(-2, 1, 64)[:, None]
    if config.granularity == "tensor":
        rows = rows.reshape(1, -1)
    dim = -1 if config.granularity == "channel" else None
    reference = LSBQuantizer() if config.scheme == "lsbq" else TernaryUnifQuantizer() if config.bits == TERNARY \
        else UnifQuantizer()
    _, table = reference.quantize(rows if dim else rows.reshape(-1), config.bits, dim=dim)
    table = table.reshape(rows.shape[0], -1)
    ours = Quantizer(config, FlatLayout([rows], "channel")).levels(rows.reshape(-1)).table
    exact = Quantizer(config, FlatLayout([rows.double()], "channel")).levels(rows.double().reshape(-1)).table
    # relative to each row's largest level: an LSBQ level near zero is a difference of the v_j, rounded on their scale
    scale = table.abs().amax(dim=1, keepdim=True).double()
    assert ((ours - table).abs() / scale).max() <= 1e-6
    assert ((ours.double() - exact).abs() / scale).max() <= 1e-6  # and as close to the exact levels

    def theirs(prox, step):
        p = rows.clone() if dim else rows.reshape(-1).clone()
        prox.apply_(p, None, table if dim else table.reshape(-1), step, dim=dim)
        return p.reshape(rows.shape)

    evenly = config.evenly_spaced
    torch.testing.assert_close(hard_quantize(rows, table, evenly_spaced=evenly), theirs(ProxHardQuant(), 0),
                               rtol=1e-6, atol=0)
    mixed = rows.lerp(hard_quantize(rows, table, evenly_spaced=evenly), 0.3)
    torch.testing.assert_close(mixed, theirs(ProxBinaryRelax(0, 10), 3), rtol=1e-6, atol=1e-7)
    for step in (1, 50, 99):
        prox = ProxPARQ(0, 100, 10, 0.5)
        from torchao.prototype.parq.optim.parq import normalized_mirror_sigmoid

        rho = max(torch.finfo(torch.float32).tiny, normalized_mirror_sigmoid(step, 0, 100, 10, 0.5))
        torch.testing.assert_close(parq_prox(rows, table, rho, evenly), theirs(prox, step), rtol=1e-6, atol=1e-7)


def test_the_references_greedy_lsbq_is_not_always_the_nearest_level():
    """Why `nearest_lsbq`: at 3 bits the reference's greedy `q` (what it copies into the weights at a refresh step)
    is not always the nearest of its own levels; qatbench (and the reference at every other step) takes the nearest."""
    from torchao.prototype.parq import LSBQuantizer, ProxHardQuant

    w = torch.tensor([0.0, 0.0, 0.25, 1.0])  # v = (0.3125, 0.34375, 0.171875): v_2 > v_1
    q, levels = LSBQuantizer.quantize_greedy(w, 3)
    assert torch.equal(levels, torch.tensor([-0.828125, -0.484375, -0.203125, -0.140625,
                                             0.140625, 0.203125, 0.484375, 0.828125]))
    nearest = w.clone()
    ProxHardQuant().apply_(nearest, None, levels, 0)
    assert q[2] == 0.140625 and nearest[2] == 0.203125  # |0.25 - 0.140625| = 0.109 > |0.25 - 0.203125| = 0.047
    assert torch.equal(hard_quantize(w[None], levels[None]), nearest[None])


def test_reference_methods_train_exactly_quantized_and_export(idx_root, isolated_data_env, tmp_path):
    from tests.conftest import smoke_run

    for name in ("torchao-ste", "torchao-binaryrelax", "torchao-parq"):
        record = smoke_run(tmp_path / name, "--method", name, "--task", "mnist-mlp", "--bits", "2", "--data-root",
                           str(idx_root))
        assert record["exactness"]["passed"] and record["export"]["packed"]


@pytest.mark.parametrize("argv, expected", [
    (["--method", "torchao-parq", "--method-arg", "slope_schedule=aprox"], "valid choices: sigmoid"),
    (["--method", "torchao-ste", "--scale", "learned"], "cannot learn its steps (--scale learned)"),
    (["--method", "torchao-parq", "--method-arg", "anneal_start=0", "--method-arg", "anneal_end=0"],
     "anneal_end=0: the reference's ProxPARQ anneals over anneal_start < anneal_end"),
    (["--method", "torchao-parq", "--task", "llama-20m", "--nproc", "2", "--fsdp"], "cannot train sharded parameters"),
])
def test_what_the_reference_cannot_serve_is_a_one_line_error(argv, expected, capsys):
    from qatbench.cli import main

    task = [] if "--task" in argv else ["--task", "mnist-mlp"]
    assert main(["run", *task, *argv, "--bits", "2", "--recipe", "smoke", "--no-download"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qatbench: error: ") and err.count("\n") == 1 and expected in err, err
