"""Every registered task, on a small data set in its real on-disk format (`Task.write_sample`): it builds, trains
through the command line, checks exactly quantized, exports, and its export evaluates to its record bit for bit.
A new task is tested here without editing a list; one that cannot be (no sample data, a missing extra) says why."""

from __future__ import annotations

import pytest

from qatbench.cli import main
from qatbench.errors import QatbenchError
from qatbench.registry import TASKS
from qatbench.results import load_records
from qatbench.task import BATCHES_NEED, Task, check_batches
from tests.conftest import load_task_data


def _sample(name: str, folder):
    task_cls = TASKS.get(name)
    try:
        task = task_cls(task_cls.Config(**task_cls.sample_options))
    except QatbenchError as err:  # an optional extra not installed
        pytest.skip(str(err))
    try:
        return task_cls, task, task_cls.write_sample(folder)
    except QatbenchError as err:
        pytest.skip(str(err))
    except ImportError as err:
        pytest.skip(f"{name}'s sample needs {err.name}")


@pytest.mark.parametrize("name", TASKS.names())
def test_every_task_trains_exports_and_evaluates_on_its_sample(name, isolated_data_env, tmp_path, capsys):
    task_cls, task, root = _sample(name, tmp_path / "data")
    check_batches(name, load_task_data(task, root, 4))  # what the harness will call on its data is there
    options = [arg for key, value in task_cls.sample_options.items() for arg in ("--task-arg", f"{key}={value}")]
    out = tmp_path / "runs"
    argv = ["run", "--method", "ste", "--task", name, "--bits", "2", "--recipe", "smoke", "--batch-size", "4",
            "--data-root", str(root), "--no-download", "--out", str(out), *options]
    assert main(argv) == 0
    [record] = load_records([out])
    assert record.status == "ok" and record.exactness["passed"] is True and record.export.get("packed") is not False
    capsys.readouterr()
    assert main(["eval", str(out / name / record.export["file"]), "--data-root", str(root)]) == 0
    assert "bit for bit" in capsys.readouterr().out


class _Loader:
    """A plain iterable of batches, as a task returning a DataLoader would hand the harness."""

    def __iter__(self):
        return iter([])


def test_batches_that_cannot_resume_are_a_one_line_error_naming_what_is_missing():
    from qatbench.task import TaskData

    with pytest.raises(QatbenchError, match="its train batches \\(_Loader\\) lack __len__, load_state_dict, shard, "
                                            "state_dict; wrap them in qatbench.batches.TensorBatches"):
        check_batches("toy", TaskData(_Loader(), _Loader(), 1, 1))
    assert set(BATCHES_NEED) == {"__iter__", "__len__", "state_dict", "load_state_dict", "shard"}


def test_registering_an_incomplete_task_says_what_it_lacks():
    from qatbench.registry import Registry

    class Incomplete(Task):
        recipes = {}

        def build_model(self):
            raise NotImplementedError

    with pytest.raises(QatbenchError, match="task class .*Incomplete: implement is_quantized, load_data, locate_data; "
                                            "give it a 'smoke' recipe"):
        Registry("task", "qatbench.tasks").register("incomplete")(Incomplete)
