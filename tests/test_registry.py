import pytest

from qatbench.errors import QatbenchError
from qatbench.registry import METHODS, TASKS, Registry, load_plugin_file


def test_builtin_methods_and_tasks_are_discovered():
    assert {"fp", "ste", "binaryrelax", "parq"} <= set(METHODS.names())
    assert {"mnist-mlp", "fashion-mnist-mlp"} <= set(TASKS.names())


def test_names_filter_by_glob():
    assert TASKS.names("*mnist*") == ["fashion-mnist-mlp", "mnist-mlp"]


def test_unknown_name_suggests_close_matches_and_lists_all():
    with pytest.raises(QatbenchError) as err:
        METHODS.get("prq")
    message = str(err.value)
    assert "unknown method 'prq'" in message and "did you mean 'parq'" in message
    assert all(name in message for name in ("binaryrelax", "fp", "parq", "ste"))
    assert "\n" not in message


def test_register_sets_the_name_and_rejects_a_second_class_under_one_name():
    registry = Registry("thing", "qatbench.methods")

    @registry.register("a")
    class A:
        pass

    assert A.name == "a"
    with pytest.raises(QatbenchError, match="registered twice"):
        @registry.register("a")
        class B:
            pass


def test_plugin_file_registers_a_method(tmp_path):
    plugin = tmp_path / "my_method.py"
    plugin.write_text(
        "from qatbench.registry import METHODS\n"
        "from qatbench.methods.ste import STE\n"
        "@METHODS.register('my-ste')\n"
        "class MySTE(STE):\n"
        "    '''A plugin.'''\n"
    )
    load_plugin_file(plugin)
    assert METHODS.get("my-ste").__name__ == "MySTE"


def test_missing_plugin_file_is_a_one_line_error(tmp_path):
    with pytest.raises(QatbenchError, match="does not exist"):
        load_plugin_file(tmp_path / "nope.py")


@pytest.mark.parametrize("source, message", [
    ("import math\ndef broken(:\n    pass\n", "line 2: SyntaxError: "),
    ("import math\n\nx = 1\nraise RuntimeError('no GPU here')\n", "line 4: RuntimeError: no GPU here"),
    ("import a_module_that_does_not_exist\n", "line 1: ModuleNotFoundError: No module named"),
    ("def helper():\n    return 1 / 0\n\nhelper()\n", "line 2: ZeroDivisionError: division by zero"),
], ids=["syntax", "raises", "import", "nested"])
def test_a_plugin_that_fails_is_one_line_naming_file_line_and_error(source, message, tmp_path, capsys):
    from qatbench.cli import main

    plugin = tmp_path / "bad_plugin.py"
    plugin.write_text(source)
    assert main(["list", "methods", "--plugin", str(plugin)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"plugin file '{plugin}', {message}" in err, err


def test_a_plugin_whose_extra_is_missing_is_listed_with_what_to_install(monkeypatch, capsys):
    from qatbench.cli import main

    registry = Registry("method", "qatbench.methods")
    registry.unavailable("needs-extra", "pip install -e '.[extra]'")
    assert registry.missing() == {"needs-extra": "pip install -e '.[extra]'"}
    with pytest.raises(QatbenchError, match=r"method 'needs-extra' is not installed: pip install -e '\.\[extra\]'"):
        registry.get("needs-extra")
    monkeypatch.setattr(METHODS, "_missing", {**METHODS.missing(), "needs-extra": "pip install -e '.[extra]'"})
    assert main(["list", "methods"]) == 0
    assert "needs-extra          not installed: pip install -e '.[extra]'" in capsys.readouterr().out


def test_without_torchao_the_reference_methods_say_how_to_get_them():
    import subprocess
    import sys

    code = "import sys; sys.modules['torchao'] = None; from qatbench.cli import main; main(['list', 'methods'])"
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in ("torchao-ste", "torchao-binaryrelax", "torchao-parq"):
        assert f"{name:<20} not installed: the PARQ authors' reference; pip install -e '.[ref]'" in printed
