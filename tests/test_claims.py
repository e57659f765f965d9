"""scripts/claims.py: a claim's paired comparison and verdict, and the transition-rate verdict, by hand-computed
values on records built here."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from qatbench.params import build_config
from qatbench.registry import METHODS
from qatbench.results import RunRecord

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "claims.py"


@pytest.fixture(scope="module")
def claims():
    spec = importlib.util.spec_from_file_location("claims_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(method: str, bits: int, seed: int, metric: float) -> RunRecord:
    defaults = json.loads(json.dumps(dataclasses.asdict(build_config(METHODS.get(method).Config, {}, method))))
    spec = {"recipe": "paper", "recipe_config": {"lr": 0.02}, "method_config": defaults,
            "quantizer": {"bits": bits, "scheme": "uniform", "granularity": "channel"}}
    return RunRecord(run_id=f"{method}{bits}{seed}", spec=spec, method=method, task="fashion-mnist-mlp", bits=bits,
                     seed=seed, status="ok", metric_name="top1", higher_is_better=True, metric=metric)


def test_a_claim_is_a_paired_comparison_with_holm_over_its_bit_widths(claims):
    # differences parq - ste over seeds 0..2: 2, 3, 4: mean 3, s = 1, t = 3 / (1 / sqrt 3) = 5.196 with 2 degrees of
    # freedom: p = 1 - t / sqrt(2 + t^2) = 0.0351; interval 3 -+ t(0.975, 2) s / sqrt 3 = 3 -+ 4.3027 * 0.5774
    records = claims.Records([*(_record("ste", 1, s, m) for s, m in enumerate([80.0, 81.0, 82.0])),
                              *(_record("parq", 1, s, m) for s, m in enumerate([82.0, 84.0, 86.0])),
                              *(_record("ste", 2, s, m) for s, m in enumerate([84.0, 84.5, 83.0])),
                              *(_record("parq", 2, s, m) for s, m in enumerate([84.5, 84.0, 84.0]))])
    table = claims.Claims(records)
    table.compare("PARQ beats STE", "paper", "here", "fashion-mnist-mlp", "parq", "ste", (1, 2), ["cmd"])
    text = "\n".join(table.parts)
    assert "1 bit: parq 84.00 [79.03, 88.97] (n = 3), ste 81.00 [78.52, 83.48] (n = 3)" in text
    assert "difference +3.00 top-1 points [+0.52, +5.48] (paired over 3 seeds, p = 0.035)" in text
    # 2 bits: differences 0.5, -0.5, 1.0: mean 1/3, s = 0.7638, t = 0.756, p = 0.529. Holm over the two bit widths:
    # 2 x 0.035 = 0.070 for the smaller, max(0.070, 1 x 0.529) = 0.529 for the larger (Bonferroni would give 1.0)
    assert "1 bit: **not decided**: parq and ste are not told apart (Holm p = 0.07)" in text
    assert "p = 0.53)" in text and "2 bits: **not decided**: parq and ste are not told apart (Holm p = 0.53)" in text
    alone = claims.Claims(records)  # 1 bit alone: no adjustment, p = 0.035 < 0.05 with parq ahead
    alone.compare("PARQ beats STE", "paper", "here", "fashion-mnist-mlp", "parq", "ste", (1,), ["cmd"])
    assert "1 bit: **supported**: parq is better than ste (Holm p = 0.035)" in "\n".join(alone.parts)


def test_a_claim_without_runs_is_not_testable_yet(claims):
    table = claims.Claims(claims.Records([_record("ste", 1, 0, 80.0)]))
    table.compare("PARQ beats STE", "paper", "here", "fashion-mnist-mlp", "parq", "ste", (1,), ["cmd"])
    assert "1 bit: **not testable yet**: the runs are missing" in "\n".join(table.parts)


SPAN = "over the epochs where the target is above 10% of its start"


@pytest.mark.parametrize("ratios, verdict", [
    ([0.97, 1.09, 1.01], f"**supported**: within 25% of the target at every such epoch (rate / target 0.97 to 1.09 "
                         f"{SPAN})"),
    ([0.8, 1.25], f"**supported**: within 25% of the target at every such epoch (rate / target 0.80 to 1.25 {SPAN})"),
    ([0.57, 0.53, 1.0], f"**not supported**: within a factor of 2 but not within 25% of the target (rate / target "
                        f"0.53 to 1.00 {SPAN}; at or below the target)"),
    ([1.3, 2.0], f"**not supported**: within a factor of 2 but not within 25% of the target (rate / target 1.30 to "
                 f"2.00 {SPAN}; at or above the target)"),
    ([0.86, 1.53], f"**not supported**: within a factor of 2 but not within 25% of the target (rate / target 0.86 "
                   f"to 1.53 {SPAN}; on both sides)"),
    ([0.4, 1.0], f"**not supported**: beyond a factor of 2 of the target (rate / target 0.40 to 1.00 {SPAN}; at or "
                 f"below the target)"),
])
def test_the_transition_rate_verdict(claims, ratios, verdict):
    assert claims._rate_verdict(ratios) == verdict
