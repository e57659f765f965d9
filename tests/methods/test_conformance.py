"""Every registered proximal method, on every quantizer configuration: its flat step (`prox_flat`, all tensors at
once) computes bit for bit what its per-tensor rule (`prox`, the definition) computes. A new method is tested
here without editing a list."""

from __future__ import annotations

import pytest
import torch

from qatbench.method import ProxMethod
from qatbench.params import build_config
from qatbench.quant import TERNARY, QuantizerConfig
from qatbench.registry import METHODS

PROX_METHODS = [name for name in METHODS.names() if issubclass(METHODS.get(name), ProxMethod)]
CONFIGS = [QuantizerConfig(bits, scheme, granularity) for scheme in ("uniform", "lsbq")
           for granularity in ("channel", "tensor") for bits in (1, 2, 3, 4, TERNARY)]
SHAPES = [(6, 5), (4, 3, 3, 3), (7,)]  # a linear, a conv (flattened per output channel) and a 1-D tensor
STEPS = 40


def _method(name: str, config: QuantizerConfig):
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator) * scale)
              for shape, scale in zip(SHAPES, (1.0, 0.05, 3.0))]
    optimizer = torch.optim.SGD([{"params": params, "quant": True}], lr=0.05, momentum=0.9)
    method_cls = METHODS.get(name)
    method = method_cls(build_config(method_cls.Config, {}, name), optimizer, config, STEPS, torch.Generator())
    method.step()  # QAT starts: latent weights and levels exist
    return method, params


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.scheme}-{c.granularity}-b{c.bits or 'T'}")
@pytest.mark.parametrize("name", PROX_METHODS)
def test_the_flat_step_is_the_per_tensor_rule_bit_for_bit(name, config):
    method, params = _method(name, config)
    latent = method.prox_input(method.latent_flat)
    for t in (0, 1, STEPS // 4, STEPS // 2, 3 * STEPS // 4 - 1, STEPS - 1, STEPS):  # before, across, after anneals
        out = torch.empty_like(latent)
        method.prox_flat(latent, t, out)
        for rows, table, got in zip(method.layout.row_views(latent), method.levels, method.layout.row_views(out)):
            assert torch.equal(got, method.prox(rows, table, t)), (t, rows.shape)


def test_every_prox_method_is_covered():
    assert {"ste", "binaryrelax", "parq", "fogzo", "talr"} <= set(PROX_METHODS)


def test_registering_an_incomplete_method_says_what_it_lacks():
    from qatbench.errors import QatbenchError
    from qatbench.method import Method
    from qatbench.registry import Registry

    class NoStep(Method):
        Config = dict

    with pytest.raises(QatbenchError, match="method class .*NoStep: implement step; its Config must be a dataclass"):
        Registry("method", "qatbench.methods").register("no-step")(NoStep)


def test_a_method_without_level_tables_exports_dense_and_the_table_says_so(idx_root, isolated_data_env, tmp_path):
    from qatbench import leaderboard
    from qatbench.cli import main
    from qatbench.results import load_records

    plugin = tmp_path / "tableless.py"
    plugin.write_text("from qatbench.methods.rtn import RoundToNearest\nfrom qatbench.registry import METHODS\n\n"
                      "@METHODS.register('rtn-tableless')\nclass Tableless(RoundToNearest):\n"
                      "    def level_tables(self):\n        return []\n")
    out = tmp_path / "runs"
    assert main(["run", "--plugin", str(plugin), "--method", "rtn-tableless", "--task", "mnist-mlp", "--bits", "2",
                 "--recipe", "smoke", "--data-root", str(idx_root), "--no-download", "--out", str(out)]) == 0
    [record] = load_records([out])
    assert record.export["packed"] is False and "gives no level_tables()" in record.export["note"]
    [cell] = leaderboard.cells([record]).to_dict("records")
    assert cell["packed_mb"] != cell["packed_mb"]  # NaN: no packed size is claimed
