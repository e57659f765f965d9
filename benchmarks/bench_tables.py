"""The tables of leaderboard/performance.md from a folder of bench records (what `qatbench bench --out DIR` wrote):

    python benchmarks/bench_tables.py DIR > DIR/tables.md

One part per record, in the order they were made: the command, the machine, torch and commit, then the tables as
`qatbench bench` printed them (the step against FP and against the reference, with the spread over rounds and the
load average). Used by benchmarks/performance.sh (CPU) and benchmarks/gpu_section.py (GPU).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def bench_tables(folder: Path) -> list[str]:
    """Markdown parts, one per bench record in `folder`, oldest first."""
    parts = []
    records = [json.loads(path.read_text()) for path in folder.glob("*.json") if path.name != "pytest-bench.json"]
    for record in sorted(records, key=lambda r: r.get("created", "")):
        environment = record["environment"]
        parts += ["", f"### `{record['command']}`", "",
                  f"{environment.get('device_name', '?')}, {environment.get('cpu_threads', '?')} CPU threads, torch "
                  f"{environment.get('torch', '?')}, commit {str(environment.get('git_commit', '?'))[:7]}, "
                  f"{record.get('created', '?')}", "", record["markdown"]]
    return parts


if __name__ == "__main__":
    print("\n".join(bench_tables(Path(sys.argv[1]))))
