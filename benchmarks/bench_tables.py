"""The tables of leaderboard/performance.md from a folder of bench records (what `qatbench bench --out DIR` wrote):

    python benchmarks/bench_tables.py DIR > DIR/tables.md

One part per record, in the order they were made: the command, the machine, torch and commit, then the tables as
`qatbench bench` printed them (the step against FP and against the reference, with the spread over rounds and the
load average). A JSON file that is not a bench record (no `markdown`) is named and skipped. Used by
benchmarks/performance.sh (CPU) and benchmarks/gpu_section.py (GPU).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def bench_tables(folder: Path) -> list[str]:
    """Markdown parts, one per bench record in `folder`, oldest first."""
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            print(f"skipped {path}: {err}", file=sys.stderr)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("markdown"), str):
            if path.name != "pytest-bench.json":  # pytest-benchmark's record, shown by performance.md itself
                print(f"skipped {path}: not a bench record (no markdown)", file=sys.stderr)
            continue
        records.append(record)
    parts = []
    for record in sorted(records, key=lambda r: str(r.get("created") or "")):
        environment = record.get("environment") if isinstance(record.get("environment"), dict) else {}
        commit = str(environment.get("git_commit") or "unknown")[:7]
        parts += ["", f"### `{record.get('command', '?')}`", "",
                  f"{environment.get('device_name', '?')}, {environment.get('cpu_threads', '?')} CPU threads, torch "
                  f"{environment.get('torch', '?')}, commit {commit}, {record.get('created', '?')}", "",
                  record["markdown"]]
    return parts


if __name__ == "__main__":
    print("\n".join(bench_tables(Path(sys.argv[1]))))
