"""The exported model: packed indices and level tables that rebuild, bit for bit, what the run evaluated."""

from __future__ import annotations

import json

import pytest
import torch

from qatbench.errors import QatbenchError
from qatbench.export import content_digest, export_model, load_export, pack_indices, unpack_indices
from qatbench.quant import TERNARY, QuantizerConfig, as_rows, estimate_levels, hard_quantize


@pytest.mark.parametrize("width", range(1, 9))
def test_indices_pack_into_width_bits_each_and_unpack(width):
    indices = torch.randint(0, 2**width, (1001,), generator=torch.Generator().manual_seed(width))
    packed = pack_indices(indices, width)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 * width // 8)
    assert torch.equal(unpack_indices(packed, width, 1001), indices)


def test_the_bit_order_is_lsb_first():
    assert pack_indices(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]


def _quantized_model(scheme, granularity, bits, channels_last=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 4 * 4, 5))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    config = QuantizerConfig(bits=bits, scheme=scheme, granularity=granularity)
    levels = {}
    with torch.no_grad():
        for name in ("0.weight", "3.weight"):
            rows = as_rows(model.get_parameter(name).detach(), granularity)
            levels[name] = estimate_levels(rows, config)
            hard_quantize(rows, levels[name], out=rows, evenly_spaced=config.evenly_spaced)
    return model, levels, config


@pytest.mark.parametrize("scheme", ["uniform", "lsbq"])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("bits", [1, TERNARY, 3, 4])
def test_an_export_rebuilds_the_state_dict_bit_for_bit(tmp_path, scheme, granularity, bits):
    model, levels, config = _quantized_model(scheme, granularity, bits, channels_last=granularity == "channel")
    summary = export_model(tmp_path / "m.safetensors", model.state_dict(), levels, config, {"identity": {"run": 1}})
    loaded = load_export(tmp_path / "m.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict[name], tensor), name
    assert loaded.quantized == ["0.weight", "3.weight"] and loaded.metadata == {"identity": {"run": 1}}
    width = 2 if bits == TERNARY else bits
    indices = -(-8 * 27 * width // 8) + -(-5 * 128 * width // 8)
    rows = (8 + 5) if granularity == "channel" else 2
    tables = rows * 4 if scheme == "uniform" else rows * (3 if bits == TERNARY else 2**bits) * 4
    others = 4 * (8 + 4 * 8 + 5) + 8  # conv bias, BatchNorm's four vectors, linear bias, num_batches_tracked
    assert summary.packed_bytes == indices + tables + others
    assert summary.fp32_bytes == 4 * (8 * 27 + 5 * 128) + others and summary.ratio == summary.packed_bytes / summary.fp32_bytes


def test_weights_that_are_not_on_their_levels_are_not_exported(tmp_path):
    model, levels, config = _quantized_model("uniform", "channel", 2)
    with torch.no_grad():
        model[3].weight[0, 0] += 1e-4
    with pytest.raises(QatbenchError, match="3.weight: its weights are not exactly on their levels"):
        export_model(tmp_path / "m.safetensors", model.state_dict(), levels, config, {})


@pytest.mark.parametrize("damage, message", [
    (lambda t, h: t.update({"3.weight.indices": t["3.weight.indices"][:-1]}), "does not hold 640 indices"),
    (lambda t, h: t.update({"3.weight.step": t["3.weight.step"][:2]}), "not one step per row"),
    (lambda t, h: h.update({"quantized": json.dumps({"3.weight": {"shape": "x"}})}), "malformed entry"),
    (lambda t, h: h.update({"quantizer": json.dumps({"bits": 99})}), "invalid quantizer"),
    (lambda t, h: h.update({"format": "other"}), "is not a qatbench export"),
    (lambda t, h: t.update({"3.weight.indices": torch.full_like(t["3.weight.indices"], 255)}),
     "an index beyond its 3 levels"),
    (lambda t, h: h.update({"quantized": json.dumps({"3.weight": {}})}), "malformed entry"),
    (lambda t, h: h.update({"quantized": json.dumps({"3.weight": {"shape": [0, 64], "rows": 1, "dtype": "float32"}})}),
     "invalid shape"),
    (lambda t, h: h.update({"quantized": json.dumps({"3.weight": {"shape": [20, 64], "rows": 20,
                                                                  "dtype": "float32"}})}), "does not hold 1280"),
    (lambda t, h: t.update({"3.weight.step": t["3.weight.step"].to(torch.int32)}), "not floating point"),
    (lambda t, h: h.update({"quantized": "[" * 100_000}), "no valid 'quantized'"),
])
def test_a_crafted_export_is_a_one_line_error(tmp_path, damage, message):
    """Exports altered by someone who also rewrote their digest: every contradiction is still caught."""
    path = _damaged(tmp_path, damage, sign=True)
    with pytest.raises(QatbenchError, match=message):
        load_export(path)


def _damaged(tmp_path, damage, sign):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, levels, config = _quantized_model("uniform", "channel", TERNARY)
    path = tmp_path / "m.safetensors"
    export_model(path, model.state_dict(), levels, config, {})
    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    damage(tensors, header)
    if sign:
        header["digest"] = content_digest(header, tensors)
    save_file(tensors, str(path), metadata=header)
    return path


@pytest.mark.parametrize("damage", [
    lambda t, h: t["3.weight.step"].mul_(1 + 2**-20),
    lambda t, h: t["0.bias"].view(torch.int32)[0].bitwise_xor_(1),
    lambda t, h: h.update({"metric": "99.9"}),
], ids=["step", "flipped-bit", "metric"])
def test_a_damaged_export_fails_its_digest(tmp_path, damage):
    with pytest.raises(QatbenchError, match="does not match its digest"):
        load_export(_damaged(tmp_path, damage, sign=False))


def test_a_record_passed_as_an_export_says_which_file_to_pass(tmp_path):
    from qatbench.errors import QatbenchError
    from qatbench.export import content_digest, load_export

    record = tmp_path / "parq-b2-s0-abc.json"
    record.write_text('{"run_id": "abc"}')
    with pytest.raises(QatbenchError, match=r"is a run record, not an export: pass .*parq-b2-s0-abc\.safetensors"):
        load_export(record)
