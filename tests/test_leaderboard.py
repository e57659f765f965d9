import pytest

from qatbench import leaderboard
from qatbench.errors import QatbenchError
from qatbench.results import RunRecord

SPEC = {"recipe": "paper", "recipe_config": {"epochs": 20, "batch_size": 128, "lr": 0.02, "optimizer": "sgd"},
        "device_type": "cpu", "method_config": {}, "task_config": {"hidden": 10}}


def _record(method, bits, seed, metric, step_ms=1.0, status="ok", exact=True, **spec):
    quantizer = None if bits is None else {"bits": bits, "scheme": "uniform", "granularity": "channel"}
    return RunRecord(
        run_id=f"{method}{bits}{seed}", spec={**SPEC, "quantizer": quantizer, **spec}, method=method, task="toy",
        bits=bits, seed=seed, status=status, metric_name="top1", higher_is_better=True, metric=metric,
        num_test=100, timing={"steady_step_ms": step_ms}, memory={"peak_rss_mb": 100.0},
        exactness={"passed": None if bits is None else exact}, command="qatbench run --task toy",
        environment={"git_commit": "abc123", "device_name": "cpu"},
    )


RECORDS = [
    _record("fp", None, 0, 90.0, 1.0), _record("fp", None, 1, 92.0, 1.0),
    _record("ste", 2, 0, 80.0, 1.5), _record("ste", 2, 1, 84.0, 1.5), _record("ste", 2, 2, 82.0, 1.5),
    _record("parq", 2, 0, 85.0, 2.0), _record("parq", 2, 1, 87.0, 2.0),
    _record("parq", 1, 0, 70.0, 2.0, exact=False),
    _record("ste", 1, 0, float("nan"), status="diverged"),
]


def test_cells_are_mean_sample_std_and_n_with_the_best_cell_bold():
    text = leaderboard.build(RECORDS, "qatbench leaderboard runs/")["toy"]
    assert "| fp       | 91.00 ± 1.41 (2) |" in text
    assert "82.00 ± 2.00 (3)" in text  # ste b2: std of 80, 84, 82 with ddof=1
    assert "**86.00 ± 1.41 (2)**" in text  # parq b2 is the best 2-bit cell
    assert "**70.00 (1)**" in text  # the only finished 1-bit run


def test_delta_vs_fp_ratio_to_fp_step_and_exactness_counts():
    text = leaderboard.build(RECORDS, "x")["toy"]
    assert "-5.00" in text and "-9.00" in text  # parq b2 and ste b2 against FP 91
    assert "| ste      | 2      | 1.500     | 1.50x   |" in text
    assert "| parq     | 1      | 2.000     | 2.00x   | 100       | 0/1" in text


def test_columns_follow_bit_order_with_ternary_between_one_and_two():
    records = [_record("ste", b, 0, 80.0) for b in (4, 0, 2, 1)]
    header = leaderboard.build(records, "x")["toy"].split("| method")[1].splitlines()[0]
    assert [c.strip() for c in header.split("|")[1:-1]] == ["FP", "1", "T", "2", "4"]


def test_unfinished_runs_are_listed_not_averaged_and_provenance_is_printed():
    text = leaderboard.build(RECORDS, "qatbench leaderboard runs/")["toy"]
    assert "Runs left out of the tables (diverged: 1)" in text
    assert "qatbench run --task toy" in text and "qatbench leaderboard runs/" in text and "abc123" in text


def test_different_budgets_get_separate_sections():
    short = {"recipe": "short", "recipe_config": {**SPEC["recipe_config"], "epochs": 5}}
    records = [_record("ste", 2, 0, 80.0), _record("ste", 2, 0, 60.0, **short)]
    text = leaderboard.build(records, "x")["toy"]
    assert text.count("## recipe") == 2 and "80.00 (1)" in text and "60.00 (1)" in text


def test_varying_method_configuration_gets_its_own_row():
    records = [_record("parq", 2, 0, 80.0, method_config={"anneal_end": 0.5}),
               _record("parq", 2, 0, 70.0, method_config={"anneal_end": 0.75})]
    text = leaderboard.build(records, "x")["toy"]
    assert "parq (anneal_end=0.5)" in text and "parq (anneal_end=0.75)" in text


def test_lower_is_better_metrics_bold_the_lowest():
    records = [_record("ste", 2, 0, 30.0), _record("parq", 2, 0, 20.0)]
    for r in records:
        r.higher_is_better, r.metric_name = False, "perplexity"
    assert "**20.00 (1)**" in leaderboard.build(records, "x")["toy"]


def test_write_makes_one_file_per_task_and_an_index_linking_the_other_pages(tmp_path):
    (tmp_path / "performance.md").write_text("# speed")
    paths = leaderboard.write(RECORDS, tmp_path, "x")
    assert sorted(p.name for p in paths) == ["README.md", "toy.md"]
    index = (tmp_path / "README.md").read_text()
    assert "[toy](toy.md)" in index and "[performance.md](performance.md)" in index


def test_no_records_is_an_error():
    with pytest.raises(QatbenchError, match="no run records"):
        leaderboard.build([], "x")


def test_transition_rate_figure_is_written_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    records = [_record("ste", 2, s, 80.0) for s in range(2)] + [_record("fp", None, 0, 90.0)]
    for r in records:
        r.history = [{"epoch": e, "transition_rate": 0.01 / e} for e in (1, 2, 3)]
    leaderboard.write(records, tmp_path, "x")
    figure = tmp_path / "toy-transitions-1.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![transition rate per epoch](toy-transitions-1.png)" in (tmp_path / "toy.md").read_text()
    assert "transitions" in (tmp_path / "toy.md").read_text()


def test_published_numbers_are_shown_beside_and_labelled():
    records = [_record("parq", 2, 0, 91.0)]
    for r in records:
        r.task = "cifar10-resnet20"
    text = leaderboard.build(records, "x")["cifar10-resnet20"]
    assert "### Published numbers (not measured here)" in text and "FP 91.82" in text and "91.71 ± 0.03" in text
