"""What QAT produces, kept: the quantized model as packed level indices and level tables (safetensors).

For each quantized tensor `W` (rows: output channels when per-channel, one row when per-tensor,
in the weight's logical, contiguous order):
  `W.indices`  uint8: every weight's level index, `b` bits each (ternary: 2 bits), packed
               LSB-first into a bit stream (weight i occupies bits i*b .. i*b + b - 1);
  `W.step`     (uniform levels) each row's step `s`, in the weight's dtype; the levels are
               `fl(c_k * s)`, `c_k = k - (m - 1) / 2` (or the integer grid `k - m/2` of learned steps,
               `qatbench.quant`), rebuilt bitwise;
  `W.levels`   (LSBQ levels) each row's sorted table of m levels, in the weight's dtype.
Every other tensor of the model's state dict (biases, norms, running statistics, tensors the
task does not quantize) is stored as it is. The metadata (strings, JSON) holds the format,
the run's identity, the method, the task and its options, the quantizer, the memory format
and, per quantized tensor, its shape, bits, row count and scheme.

Loading an export rebuilds the state dict: `W = table[row, index]`, bitwise the weights the
run evaluated. An export is untrusted input: safetensors holds tensors only (no pickle), the
header's `digest` (BLAKE2b over every other header entry and every tensor's name, dtype, shape
and bytes) must match, so a damaged file is refused, and every metadata value and tensor shape
is checked before use. (Exports of format 1, written before the digest, are read without it.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy
import torch
from torch import Tensor

from .atomic import atomic_path
from .errors import QatbenchError
from .quant import TERNARY, QuantizerConfig, as_rows, grid, grid_coefficients, num_levels

FORMAT = "qatbench-packed-2"
FORMATS_READ = ("qatbench-packed-1", FORMAT)  # 1: without a digest


def content_digest(header: dict[str, str], tensors: dict[str, Tensor]) -> str:
    """BLAKE2b of an export's header entries (but the digest) and tensors, in name order."""
    hasher = hashlib.blake2b(digest_size=32)
    for key in sorted(k for k in header if k != "digest"):
        hasher.update(f"H{len(key)}:{key}{len(header[key])}:{header[key]}".encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().reshape(-1).contiguous().cpu()
        hasher.update(f"T{len(name)}:{name}{tensor.dtype}{tuple(tensors[name].shape)}".encode())
        hasher.update(memoryview(tensor.view(torch.uint8).numpy()) if tensor.numel() else b"")
    return hasher.hexdigest()


def index_bits(bits: int) -> int:
    """Bits stored per weight: b, or 2 for ternary (3 levels)."""
    return 2 if bits == TERNARY else bits


def pack_indices(indices: Tensor, width: int) -> Tensor:
    """Level indices (any integer dtype, values < 2^width) as a uint8 bit stream, `width` bits each, LSB first."""
    values = indices.reshape(-1).to(torch.int64).cpu().numpy()
    bits = (values[:, None] >> numpy.arange(width)) & 1
    return torch.from_numpy(numpy.packbits(bits.astype(numpy.uint8).reshape(-1), bitorder="little"))


def unpack_indices(packed: Tensor, width: int, count: int) -> Tensor:
    """The `count` indices of a bit stream written by `pack_indices`, int64."""
    bits = numpy.unpackbits(packed.cpu().numpy(), count=count * width, bitorder="little")
    weights = (1 << numpy.arange(width)).astype(numpy.int64)
    return torch.from_numpy(bits.reshape(count, width).astype(numpy.int64) @ weights)


def exact_indices(rows: Tensor, levels: Tensor, name: str) -> Tensor:
    """Each weight's index in its row's table, where the weight must be bitwise an entry of the table."""
    index = torch.searchsorted(levels.contiguous(), rows.contiguous()).clamp_(max=levels.shape[1] - 1)
    if not torch.equal(levels.gather(1, index), rows):
        raise QatbenchError(f"cannot export {name}: its weights are not exactly on their levels")
    return index


@dataclasses.dataclass(frozen=True)
class ExportSummary:
    """What the record says of an export: where it is and how large, against the fp32 model."""

    file: str  # the export's file name, beside the record
    packed_bytes: int  # bytes of every tensor in the file (indices, tables, the unquantized tensors)
    fp32_bytes: int  # the same model with every floating-point tensor in fp32
    file_bytes: int
    ratio: float  # packed / fp32
    packed: bool = True  # False: a quantizing method gave no level tables, so its weights are stored dense

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def export_model(path: Path, state: dict[str, Tensor], levels: dict[str, Tensor], quantizer: QuantizerConfig | None,
                 metadata: dict[str, Any]) -> ExportSummary:
    """Write a model's state dict `state` to `path` (atomically), the tensors named in `levels` (name -> their
    rows' level tables) as packed indices and tables. `metadata` (JSON values) goes into the file's header."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    quantized: dict[str, dict[str, Any]] = {}
    fp32_bytes = 0
    for name, value in state.items():
        value = value.detach().contiguous()  # the logical order, whatever the memory format
        fp32_bytes += value.numel() * (4 if value.is_floating_point() else value.element_size())
        if name not in levels:
            tensors[name] = value.cpu()
            continue
        assert quantizer is not None
        rows = as_rows(value, quantizer.granularity)
        table = levels[name]
        tensors[f"{name}.indices"] = pack_indices(exact_indices(rows, table, name), index_bits(quantizer.bits))
        if quantizer.scheme == "uniform":
            tensors[f"{name}.step"] = grid(table, quantizer.integer_grid)[1].reshape(-1).cpu().contiguous()
        else:
            tensors[f"{name}.levels"] = table.cpu().contiguous()
        quantized[name] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                           "rows": rows.shape[0]}
    header = {"format": FORMAT, "quantized": json.dumps(quantized),
              "quantizer": json.dumps(dataclasses.asdict(quantizer) if quantizer else None),
              **{k: json.dumps(v) for k, v in metadata.items()}}
    header["digest"] = content_digest(header, tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    packed = sum(t.numel() * t.element_size() for t in tensors.values())
    return ExportSummary(path.name, packed, fp32_bytes, path.stat().st_size, packed / fp32_bytes)


@dataclasses.dataclass
class LoadedExport:
    """An export read back: the dense state dict and what the header says."""

    state_dict: dict[str, Tensor]
    metadata: dict[str, Any]
    quantizer: QuantizerConfig | None
    quantized: list[str]


def _json(header: dict[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(header[key])
    except (KeyError, TypeError, ValueError, RecursionError):
        raise QatbenchError(f"{path}: its header has no valid {key!r}") from None


def load_export(path: Path) -> LoadedExport:
    """The dense state dict of an export (every quantized weight rebuilt from its indices and table)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (OSError, SafetensorError, ValueError, RuntimeError) as err:
        if Path(path).suffix == ".json":
            raise QatbenchError(f"{path} is a run record, not an export: pass the export beside it, "
                                f"{Path(path).with_suffix('.safetensors')}") from None
        if Path(path).suffix == ".ckpt":
            raise QatbenchError(f"{path} is a checkpoint, not an export: `qatbench export "
                                f"{Path(path).with_suffix('.json')}` writes the export of a finished run's kept "
                                f"final checkpoint") from None
        raise QatbenchError(f"cannot read export {path}: {err}") from None
    if header.get("format") not in FORMATS_READ:
        raise QatbenchError(f"{path} is not a qatbench export (format {header.get('format')!r}, expected {FORMAT!r})")
    if header["format"] == FORMAT and header.get("digest") != content_digest(header, tensors):
        raise QatbenchError(f"{path} does not match its digest: the file is damaged or was changed")
    quantizer_fields = _json(header, "quantizer", path)
    quantized = _json(header, "quantized", path)
    if not isinstance(quantized, dict) or (quantized and not isinstance(quantizer_fields, dict)):
        raise QatbenchError(f"{path}: malformed header")
    try:
        quantizer = QuantizerConfig(**quantizer_fields) if quantizer_fields else None
    except (TypeError, QatbenchError) as err:
        raise QatbenchError(f"{path}: invalid quantizer in its header ({err})") from None
    state = {k: v for k, v in tensors.items() if not any(k == f"{n}.{s}" for n in quantized
                                                             for s in ("indices", "step", "levels"))}
    for name, info in quantized.items():
        state[name] = _rebuild(path, name, info, tensors, quantizer)
    metadata = {k: _json(header, k, path) for k in header if k not in ("format", "quantized", "quantizer", "digest")}
    return LoadedExport(state, metadata, quantizer, sorted(quantized))


def _rebuild(path: Path, name: str, info: Any, tensors: dict[str, Tensor], quantizer: QuantizerConfig) -> Tensor:
    """One quantized weight from its packed indices and level table, after checking every shape."""
    try:
        shape, rows, dtype = [int(d) for d in info["shape"]], int(info["rows"]), getattr(torch, info["dtype"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise QatbenchError(f"{path}: malformed entry for {name!r} in its header") from None
    count, m, width = math.prod(shape), num_levels(quantizer.bits), index_bits(quantizer.bits)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or rows < 1 or count < 1 or count % rows \
            or any(d < 1 for d in shape):
        raise QatbenchError(f"{path}: {name!r} has an invalid shape {shape}, dtype or row count {rows}")
    packed = tensors.get(f"{name}.indices")
    if packed is None or packed.dtype != torch.uint8 or packed.shape != (math.ceil(count * width / 8),):
        raise QatbenchError(f"{path}: {name}.indices is missing or does not hold {count} indices of {width} bits")
    if quantizer.scheme == "uniform":
        step = tensors.get(f"{name}.step")
        if step is None or step.shape != (rows,):
            raise QatbenchError(f"{path}: {name}.step is missing or not one step per row ({rows})")
        coefficients = grid_coefficients(m, step.dtype, integer=quantizer.integer_grid)
        table = coefficients * step[:, None] if step.is_floating_point() else None
    else:
        table = tensors.get(f"{name}.levels")
        if table is None or table.shape != (rows, m):
            raise QatbenchError(f"{path}: {name}.levels is missing or not a ({rows}, {m}) table")
    if table is None or not table.is_floating_point():
        raise QatbenchError(f"{path}: the level table of {name} is not floating point")
    index = unpack_indices(packed, width, count).view(rows, -1)
    if int(index.max()) >= m:
        raise QatbenchError(f"{path}: {name}.indices holds an index beyond its {m} levels")
    return table.gather(1, index).to(dtype).view(shape)


def check_fits(model: torch.nn.Module, state: Any, what: str) -> None:
    """`state` has exactly the model's entries, each of its shape and of a dtype it can take; else a one-line error
    naming the first misfit (before anything is loaded)."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise QatbenchError(f"{what} is not a state dict (names and tensors)")
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise QatbenchError(f"{what} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in expected.items():
        given = state[name]
        if given.shape != tensor.shape or given.is_floating_point() != tensor.is_floating_point():
            raise QatbenchError(f"{what} does not fit the model: {name} is {given.dtype} {tuple(given.shape)}, the "
                                f"model's is {tensor.dtype} {tuple(tensor.shape)}")
