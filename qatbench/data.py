"""Finding data sets on disk, and reading the IDX format of (Fashion-)MNIST.

Resolution order for a data set: a given `--data-root` is the only
place searched (missing data there is an error, never a fallback); without it,
`$QATBENCH_DATA`, `~/.cache/qatbench`, the system data set folders (Debian's
`dataset-*` packages install under `/usr/share/datasets`), then a download where
the library can. Each root is searched as given and in the data set's
conventional sub-folders.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .errors import QatbenchError

SYSTEM_DATA_DIR = Path("/usr/share/datasets")


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "qatbench"


@dataclasses.dataclass(frozen=True)
class DataSource:
    """The data a task reads: the folder (or file) it was found in and every file it reads."""

    dataset: str
    root: Path
    files: tuple[Path, ...]


def candidate_roots(data_root: Path | None) -> list[Path]:
    """Every root to search, in order: a given `data_root` alone, else the default places."""
    if data_root is not None:
        return [Path(data_root).expanduser()]
    roots = [Path(os.environ["QATBENCH_DATA"])] if os.environ.get("QATBENCH_DATA") else []
    roots += [default_cache_dir(), SYSTEM_DATA_DIR]
    return [Path(r).expanduser() for r in roots]


def _has_files(folder: Path, entries: Sequence[str]) -> bool:
    """Whether every entry (a file, possibly gzipped, or a folder) exists in `folder`."""
    return all((folder / e).exists() or (folder / f"{e}.gz").is_file() for e in entries)


def locate(
    dataset: str,
    files: Sequence[str],
    subdirs: Sequence[str],
    data_root: Path | None,
    how_to_get: str,
    download: Callable[[Path], None] | None = None,
) -> Path:
    """The first folder holding all `files` (files, plain or `.gz`, or sub-folders), downloading as a last resort.

    A given `data_root` is the only root searched, and nothing is downloaded for it."""
    looked: list[Path] = []
    for root in candidate_roots(data_root):
        for sub in ("", *subdirs):
            folder = root / sub if sub else root
            looked.append(folder)
            if _has_files(folder, files):
                return folder
    places = ", ".join(str(p) for p in dict.fromkeys(looked))
    if data_root is not None:
        raise QatbenchError(f"{dataset} not found in --data-root {str(data_root)!r} (looked in: {places}). "
                            f"{how_to_get}")
    failure = ""
    if download is not None:
        target = default_cache_dir()
        try:
            download(target)
        except Exception as err:  # any network or library failure ends in the one-line error below
            failure = f"; download into {target} failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        else:
            for sub in subdirs:
                if _has_files(target / sub, files):
                    return target / sub
    raise QatbenchError(f"{dataset} not found (looked in: {places}){failure}. {how_to_get}")


def existing_file(path: Path) -> Path:
    """`path`, or `path.gz` if only that exists."""
    return path if path.is_file() else path.with_name(path.name + ".gz")


def read_maybe_gzip(path: Path) -> bytes:
    """The bytes of `path` (or `path.gz`), decompressed when gzip (recognised by its magic bytes);
    a damaged file is a one-line error naming it."""
    path = existing_file(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as err:
        raise QatbenchError(f"cannot read {path}: {type(err).__name__}: {err}") from None


# Written by hand: torchvision's IDX parser is private API and reads only
# uncompressed files, while Debian ships the archives gzipped (with gzip bytes that
# differ from upstream's, so the content is read and no archive checksum is used).
_IDX_DTYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32, 0x0D: torch.float32,
               0x0E: torch.float64}


def read_idx(path: Path) -> Tensor:
    """Read an IDX file (the MNIST format): magic `00 00 <dtype> <ndim>`, big-endian int32 dims, data."""
    raw = read_maybe_gzip(path)
    path = existing_file(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise QatbenchError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise QatbenchError(f"{path}: IDX header of {ndim} dimensions is cut short ({len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = raw[4 + 4 * ndim :]
    expected = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
    if len(data) != expected:
        raise QatbenchError(f"{path}: IDX header says shape {tuple(shape)} ({expected} bytes), file holds {len(data)}")
    tensor = torch.frombuffer(bytearray(data), dtype=dtype)
    if dtype.itemsize > 1:  # IDX is big-endian
        tensor = tensor.view(torch.uint8).view(-1, dtype.itemsize).flip(1).reshape(-1).view(dtype)
    return tensor.reshape(shape)


_IDX_CODES = {dtype: code for code, dtype in _IDX_DTYPES.items()}


def write_idx(path: Path, tensor: Tensor, compress: bool) -> Path:
    """Write `tensor` as an IDX file (the inverse of `read_idx`: big-endian header and data), gzipped (`path.gz`)
    if `compress`; the path written."""
    header = bytes([0, 0, _IDX_CODES[tensor.dtype], tensor.dim()]) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    data = tensor.contiguous()
    if data.element_size() > 1:
        data = data.view(torch.uint8).view(-1, data.element_size()).flip(1)
    payload = header + bytes(data.numpy().tobytes())
    if compress:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def check_labels(path: Path, labels: Tensor, num_examples: int, num_classes: int) -> None:
    """Labels must be one per example and lie in `[0, num_classes)`; else a one-line error naming the file."""
    if labels.dim() != 1 or len(labels) != num_examples:
        raise QatbenchError(f"{path}: {tuple(labels.shape)} labels for {num_examples} examples; "
                            "the label and image files do not belong together")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise QatbenchError(f"{path}: labels range over [{int(labels.min())}, {int(labels.max())}], "
                            f"outside the task's {num_classes} classes [0, {num_classes - 1}]")
