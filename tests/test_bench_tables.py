"""benchmarks/bench_tables.py: the tables of performance.md from a folder of bench records, oldest first; files
that are not bench records are named and skipped."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tables.py"


def test_bench_records_become_sections_and_other_files_are_skipped(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    environment = {"device_name": "AMD EPYC", "cpu_threads": 1, "torch": "2.14.1", "git_commit": "f43a8402332b"}
    for name, created in (("late", "2026-12-05T19:00:00"), ("early", "2026-12-05T18:00:00")):
        (tmp_path / f"{name}.json").write_text(json.dumps({"command": f"qatbench bench --task {name}", "created": created,
                                                            "environment": environment, "markdown": f"| {name} |"}))
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "other.json").write_text(json.dumps({"command": "x"}))
    text = "\n".join(module.bench_tables(tmp_path))
    assert text.index("### `qatbench bench --task early`") < text.index("### `qatbench bench --task late`")
    assert "AMD EPYC, 1 CPU threads, torch 2.14.1, commit f43a840, 2026-12-05T18:00:00" in text and "| late |" in text
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.json" in err and "other.json: not a bench record" in err
