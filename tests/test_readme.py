"""The README's code runs. Its Python blocks are the method and the task a contributor starts from; every shell command of
the README that runs on the MLP tasks runs here as written, on the test's IDX data at the smoke recipe on the
CPU (`--data-root`, `--recipe smoke`, `--device cpu` added or changed; sweep files from a copy whose recipe is
`smoke` and seeds `[0]`; `<hash>` is the file a previous command wrote). Commands that need other data or a
GPU (`/data/...`, `DATA`, other tasks) and the install one-liners (CI runs those) are left out by name."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import yaml

from qatbench.cli import main

ROOT = Path(__file__).parent.parent
MLP_TASKS = ("mnist-mlp", "fashion-mnist-mlp", "table-mlp")  # table-mlp: the README's own task


def _blocks(language: str) -> list[str]:
    return [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
            if lang == language]


def _commands() -> list[list[str]]:
    """Every `qatbench ...` command of the README's shell blocks (continuations joined, comments dropped)."""
    commands = []
    for block in _blocks(""):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("qatbench "):
                commands.append(shlex.split(line.split("#")[0])[1:])
    return commands


def _runs_here(argv: list[str]) -> bool:
    text = " ".join(argv)
    if any(marker in text for marker in ("/data/", "DATA", "INIT", "tinystories", "runs/before")):
        return False
    tasks = re.findall(r"--task (\S+)", text)
    if argv[0] == "sweep":
        return yaml.safe_load((ROOT / argv[1]).read_text()).get("task") in MLP_TASKS
    return all(t in MLP_TASKS for t in tasks)


def _here(argv: list[str], idx_root: Path, folder: Path) -> list[str]:
    """The command on the test data: smoke recipe, CPU, the IDX folder; `<hash>` resolved."""
    argv = ["cpu" if a.startswith("cuda") else a for a in argv]
    argv = [str(next(folder.glob(a.replace("<hash>", "*")))) if "<hash>" in a else a for a in argv]
    if argv[0] in ("run", "sweep", "bench", "status", "eval") and "--data-root" not in argv:
        argv += ["--data-root", str(idx_root)]
    if argv[0] in ("run", "sweep", "bench"):
        argv += ["--no-download"]
    if argv[0] == "run":
        argv = [*argv, "--recipe", "smoke"] if "--recipe" not in argv else \
            [("smoke" if argv[i - 1] == "--recipe" else a) for i, a in enumerate(argv)]
    if argv[0] == "bench":
        argv += ["--steps", "1", "--warmup", "1", "--rounds", "1"]
    return argv


def test_the_readme_plugin_and_commands_run(idx_root, isolated_data_env, tmp_path, monkeypatch):
    for name in ("my_method.py", "my_task.py"):
        [plugin] = [b for b in _blocks("python") if f"# {name}" in b]
        (tmp_path / name).write_text(plugin)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    for config in (tmp_path / "configs").glob("*.yaml"):
        sweep = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump({**sweep, "recipe": "smoke", "seeds": [0]}))
    monkeypatch.chdir(tmp_path)
    ran = []
    for argv in _commands():
        if not _runs_here(argv):
            continue
        command = _here(argv, idx_root, tmp_path)
        assert main(command) == 0, command
        ran.append(argv[0])
    assert {"run", "sweep", "leaderboard", "status", "eval", "bench", "sample"} <= set(ran)
    assert list((tmp_path / "runs").rglob("halfway-b2-s0-*.json"))  # the plugin trained
    assert len(list((tmp_path / "runs" / "table").rglob("*.json"))) == 3  # so did the README's task
    assert (tmp_path / "leaderboard" / "fashion-mnist-mlp.md").exists()

