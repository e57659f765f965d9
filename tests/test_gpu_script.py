"""`benchmarks/gpu.sh --dry-run`: the GPU acceptance script's every step, on the CPU at toy sizes, so that the
one command a lent GPU runs is known to work before it runs."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_acceptance_script_runs_dry_on_the_cpu(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    section = (out / "gpu.md").read_text()
    runs = [line for line in section.splitlines() if line.startswith("| cifar10-resnet20") or
            line.startswith("| llama-130m")]
    assert len(runs) == 4 and all("| ok " in line for line in runs), section  # fp and parq, each task
    assert section.count("### `qatbench bench") == 2 and section.count("Against the PARQ authors' reference") == 2
    assert "CUDA-only tests" in section and "skipped" in section  # no GPU here: they skip, and say so
