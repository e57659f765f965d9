"""Text corpora for language-model tasks: find, read, tokenize once, cache as a flat token tensor.

A corpus is a `.txt` file, a folder of `.txt` files (read in name order; a folder whose `.txt`
files lie in `train/` and `validation/` has that split, as `qatbench corpus` writes it), or a
Hugging Face `datasets` dataset saved with `save_to_disk` (a `text` column; its `validation` or
`test` split is the held-out text when present). Tokens are cached under
`~/.cache/qatbench/tokens/`, keyed by the files' names, sizes and modification times and
by the tokenizer, so a corpus is tokenized once. A cache entry carries a checksum of its
tokens; one that does not load or does not match is rebuilt.

Text files must be text: a file with NUL bytes, or with more than `MAX_UNDECODABLE` of
its bytes not valid UTF-8, is refused with an error naming it.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from .atomic import atomic_path
from .data import default_cache_dir
from .errors import QatbenchError

MAX_UNDECODABLE = 0.001  # share of a text file's bytes that may be invalid UTF-8 (replaced by U+FFFD)

HOW_TO_GET_TEXT = (
    "Pass --data-root CORPUS: a .txt file, a folder of .txt files, or a `datasets` dataset saved with "
    "save_to_disk (TinyStories, WikiText-103 or C4 shards, with a 'text' column)."
)


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to download, lossless round trip."""

    name = "byte"
    vocab_size = 256
    separator = b"\n\n"

    def encode(self, text: str) -> bytes:
        return text.encode("utf-8")

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """Any Hugging Face tokenizer, by hub name or local path (transformers is the `llm` extra)."""

    def __init__(self, name: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise QatbenchError(f"tokenizer {name!r} needs transformers: pip install 'qatbench[llm]'") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise QatbenchError(f"cannot load tokenizer {name!r}: {str(err).splitlines()[0]}") from None
        self.name = name
        self.vocab_size = len(self.tokenizer)
        self.separator = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


Tokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(name: str) -> Tokenizer:
    return ByteTokenizer() if name == "byte" else HFTokenizer(name)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists())


def _split_folders(path: Path) -> tuple[Path, Path] | None:
    """(train, validation) of a folder split into `train/` and `validation/` subfolders, else None."""
    train, validation = path / "train", path / "validation"
    if not path.is_dir() or _is_saved_dataset(path):
        return None
    return (train, validation) if train.is_dir() and validation.is_dir() else None


def corpus_files(path: Path) -> list[Path]:
    """The files that make up a corpus (what its cache key is computed from)."""
    if path.is_file():
        return [path]
    if _is_saved_dataset(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    split = _split_folders(path)
    files = sorted(path.glob("*.txt")) if split is None else [*sorted(split[0].glob("*.txt")),
                                                              *sorted(split[1].glob("*.txt"))]
    if split is not None and not all(any(folder.glob("*.txt")) for folder in split):
        raise QatbenchError(f"{path}: train/ and validation/ must each hold .txt files")
    if split is not None and any(path.glob("*.txt")):
        raise QatbenchError(f"{path} holds .txt files beside train/ and validation/: move them into one of the two "
                            "(a split corpus reads only those)")
    if not files:
        raise QatbenchError(f"{path} holds no .txt files and no saved `datasets` dataset. {HOW_TO_GET_TEXT}")
    return files


def read_text_file(path: Path) -> str:
    """The UTF-8 text of `path`; a binary file is a one-line error naming it."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise QatbenchError(f"cannot read {path}: {err.strerror or err}") from None
    if b"\0" in raw:
        raise QatbenchError(f"{path} is not a text file (it holds NUL bytes). {HOW_TO_GET_TEXT}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if bad > MAX_UNDECODABLE * len(raw):
        raise QatbenchError(f"{path} is not UTF-8 text ({bad} of its {len(raw)} bytes are not valid UTF-8)")
    return text


def _documents(path: Path) -> tuple[Iterator[str], Iterator[str] | None]:
    """(training texts, held-out texts or None) of a corpus."""
    split = _split_folders(path)
    if split is not None:
        corpus_files(path)  # both parts hold text
        train, validation = ((read_text_file(f) for f in sorted(part.glob("*.txt"))) for part in split)
        return train, validation
    if not _is_saved_dataset(path):
        return (read_text_file(f) for f in corpus_files(path)), None
    try:
        import datasets
    except ImportError:
        raise QatbenchError(f"{path} is a saved `datasets` dataset: pip install datasets") from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        held_out = next((loaded[s] for s in ("validation", "test") if s in loaded), None)
        train = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        return iter(train["text"]), (iter(held_out["text"]) if held_out is not None else None)
    return iter(loaded["text"]), None


def _tokenize(texts: Iterator[str], tokenizer: Tokenizer) -> Tensor:
    """All texts, tokenized and joined by the tokenizer's document separator, as one flat tensor."""
    dtype = torch.uint8 if tokenizer.vocab_size <= 256 else torch.int32
    pieces = []
    for text in texts:
        if text:
            ids = tokenizer.encode(text)
            pieces.append(torch.tensor(bytearray(ids) if isinstance(ids, bytes) else ids, dtype=dtype))
            pieces.append(torch.tensor(bytearray(tokenizer.separator) if isinstance(tokenizer.separator, bytes)
                                       else tokenizer.separator, dtype=dtype))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=dtype)


def _token_checksum(train: Tensor, val: Tensor) -> str:
    digest = hashlib.sha256()
    for tokens in (train, val):
        digest.update(f"{tokens.dtype}:{tokens.numel()}:".encode())
        digest.update(tokens.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read_cache(cache: Path) -> tuple[Tensor, Tensor] | None:
    """The cached (train, val) tokens, or None (with a warning) when the entry is damaged."""
    try:
        saved = torch.load(cache, weights_only=True)
        train, val = saved["train"], saved["val"]
        if not (isinstance(train, Tensor) and isinstance(val, Tensor) and train.dim() == val.dim() == 1
                and saved["checksum"] == _token_checksum(train, val)):
            raise ValueError("its tokens do not match their checksum")
    except Exception as err:  # a damaged file can fail in torch.load in many ways
        warnings.warn(f"rebuilding the damaged token cache {cache} ({type(err).__name__}: {err})", stacklevel=3)
        return None
    return train, val


def load_tokens(path: Path, tokenizer: Tokenizer, val_fraction: float) -> tuple[Tensor, Tensor]:
    """(training tokens, held-out tokens), from the cache when the corpus was tokenized before.

    Without a held-out split in the corpus, the last `val_fraction` of the token stream is held out."""
    if not path.exists():
        raise QatbenchError(f"corpus {str(path)!r} does not exist. {HOW_TO_GET_TEXT}")
    key = hashlib.sha256(tokenizer.name.encode())
    for f in corpus_files(path):
        stat = f.stat()
        key.update(f"{f.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    cache = default_cache_dir() / "tokens" / f"{key.hexdigest()[:20]}-{val_fraction}.pt"
    cached = _read_cache(cache) if cache.exists() else None
    if cached is not None:
        return cached
    train_texts, held_out_texts = _documents(path)
    train = _tokenize(train_texts, tokenizer)
    if held_out_texts is not None:
        val = _tokenize(held_out_texts, tokenizer)
    else:
        cut = len(train) - max(1, round(val_fraction * len(train)))
        train, val = train[:cut].clone(), train[cut:].clone()
    with atomic_path(cache) as tmp:
        torch.save({"train": train, "val": val, "checksum": _token_checksum(train, val)}, tmp)
    return train, val
