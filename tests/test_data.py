import gzip

import pytest
import torch

from qatbench.data import candidate_roots, locate, read_idx
from qatbench.errors import QatbenchError
from qatbench.data import write_idx

FILES = ["train-images-idx3-ubyte"]


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.float32])
def test_read_idx_round_trips_plain_and_gzipped(tmp_path, compress, dtype):
    tensor = (torch.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).to(dtype) if dtype != torch.uint8 else \
        torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "x-idx3-ubyte", tensor, compress)
    assert torch.equal(read_idx(path), tensor)
    assert torch.equal(read_idx(tmp_path / "x-idx3-ubyte"), tensor)  # finds the .gz by itself


def test_gzip_is_detected_by_content_not_name(tmp_path):
    path = write_idx(tmp_path / "y", torch.zeros(3, dtype=torch.uint8), compress=True)
    renamed = tmp_path / "plain-name"
    renamed.write_bytes(path.read_bytes())
    assert read_idx(renamed).tolist() == [0, 0, 0]


def test_a_corrupt_gzip_file_is_an_error_naming_it(tmp_path):
    path = write_idx(tmp_path / "x-idx1-ubyte", torch.zeros(100, dtype=torch.uint8), compress=True)
    path.write_bytes(path.read_bytes()[:20] + b"\x00" * 10)
    with pytest.raises(QatbenchError, match=f"cannot read {path}"):
        read_idx(tmp_path / "x-idx1-ubyte")


@pytest.mark.parametrize("labels, message", [
    (torch.zeros(3, dtype=torch.uint8), r"\(3,\) labels for 4 examples"),
    (torch.tensor([0, 1, 2, 12], dtype=torch.uint8), r"labels range over \[0, 12\], outside the task's 10 classes"),
])
def test_labels_must_match_the_images_in_count_and_range(tmp_path, idx_root, isolated_data_env, labels, message):
    from qatbench.registry import TASKS
    from tests.conftest import load_task_data

    write_idx(idx_root / "t10k-labels-idx1-ubyte", labels, compress=False)
    write_idx(idx_root / "t10k-images-idx3-ubyte", torch.zeros(4, 28, 28, dtype=torch.uint8), compress=False)
    task = TASKS.get("mnist-mlp")(TASKS.get("mnist-mlp").Config())
    with pytest.raises(QatbenchError, match=message) as err:
        load_task_data(task, idx_root, 64)
    assert "t10k-labels-idx1-ubyte" in str(err.value)


def test_bad_magic_and_truncated_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(QatbenchError, match="not an IDX file"):
        read_idx(bad)
    truncated = tmp_path / "short"
    truncated.write_bytes(gzip.decompress(write_idx(tmp_path / "full", torch.zeros(10, dtype=torch.uint8), True).read_bytes())[:-3])
    with pytest.raises(QatbenchError, match="IDX header says shape"):
        read_idx(truncated)


def test_a_given_data_root_is_the_only_place_else_env_then_cache_then_system(monkeypatch, tmp_path):
    monkeypatch.setenv("QATBENCH_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert candidate_roots(tmp_path / "given") == [tmp_path / "given"]
    roots = candidate_roots(None)
    assert roots == [tmp_path / "env", tmp_path / "home/.cache/qatbench", roots[-1]]
    assert str(roots[-1]) == "/usr/share/datasets"


def test_locate_finds_files_in_a_subfolder_of_a_root(tmp_path, isolated_data_env):
    folder = tmp_path / "root" / "fashion-mnist"
    folder.mkdir(parents=True)
    write_idx(folder / FILES[0], torch.zeros(1, dtype=torch.uint8), compress=True)
    assert locate("X", FILES, ["fashion-mnist"], tmp_path / "root", "get it") == folder


def test_locate_names_every_place_looked_and_how_to_get_the_data(tmp_path, isolated_data_env, monkeypatch):
    monkeypatch.setenv("QATBENCH_DATA", str(tmp_path / "env"))

    def offline(target):
        raise OSError("network unreachable")

    with pytest.raises(QatbenchError) as err:
        locate("Some-Data", FILES, ["some"], None, "Install it like so.", download=offline)
    message = str(err.value)
    assert str(tmp_path / "env") in message and str(tmp_path / "env" / "some") in message
    assert ".cache/qatbench" in message and "/usr/share/datasets" in message
    assert "download into" in message and "network unreachable" in message
    assert message.endswith("Install it like so.") and "\n" not in message


def test_a_given_root_is_searched_alone_and_nothing_is_downloaded_for_it(tmp_path, isolated_data_env):
    def must_not_download(target):
        raise AssertionError("downloaded although --data-root was given")

    with pytest.raises(QatbenchError, match="not found in --data-root") as err:
        locate("Some-Data", FILES, ["some"], tmp_path / "nowhere", "Install it.", download=must_not_download)
    assert ".cache/qatbench" not in str(err.value) and str(tmp_path / "nowhere" / "some") in str(err.value)
