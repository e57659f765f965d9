import io
import json
import sys

import pandas as pd
import pytest

from qatbench import leaderboard
from qatbench.errors import QatbenchError
from qatbench.results import RunRecord

SPEC = {"recipe": "paper", "recipe_config": {"epochs": 20, "batch_size": 128, "lr": 0.02, "optimizer": "sgd"},
        "device_type": "cpu", "method_config": {}, "task_config": {"hidden": 10}}
MB = 2**20


def _record(method, bits, seed, metric, step_ms=1.0, status="ok", exact=True, quantized=None, task="toy",
            memory=None, export=None, train_s=None, **spec):
    """A record as the harness writes it; `quantized` defaults to "has a bit width" (the FP baseline has none)."""
    quantizer = {"bits": 2 if bits is None else bits, "scheme": "uniform", "granularity": "channel"}
    record = RunRecord(
        run_id=f"{method}{bits}{seed}", spec={**SPEC, "quantizer": quantizer, **spec}, method=method, task=task,
        bits=bits, seed=seed, status=status, metric_name="top1", higher_is_better=True, metric=metric,
        num_test=100, timing={"steady_step_ms": step_ms, **({} if train_s is None else {"train_s": train_s})},
        memory={"peak_rss_mb": 100.0} if memory is None else memory,
        exactness={"passed": None if bits is None else exact}, command="qatbench run --task toy",
        environment={"git_commit": "abc123", "device_name": "cpu"},
    )
    for name, value in {"quantized": bits is not None if quantized is None else quantized, "export": export}.items():
        setattr(record, name, value)  # fields of schema 2 that older constructors may lack
    return record


def _records(method, bits, metrics, **kwargs):
    return [_record(method, bits, seed, m, **kwargs) for seed, m in enumerate(metrics)]


RECORDS = [
    *_records("fp", None, [90.0, 92.0]),
    *_records("ste", 2, [80.0, 84.0, 82.0], step_ms=1.5),
    *_records("parq", 2, [85.0, 87.0], step_ms=2.0),
    *_records("talr", 2, [70.0, 70.5, 69.5], step_ms=2.0),
    _record("parq", 1, 0, 70.0, 2.0, exact=False),
    _record("ste", 1, 0, float("nan"), status="diverged"),
]


def _table(text, *header):
    """The body rows (lists of stripped cells) of the first markdown table whose header starts with `header`."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[:len(header)] == list(header):
            body = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                body.append([c.strip() for c in row.strip().strip("|").split("|")])
            return body
    raise AssertionError(f"no table with header {header}")


def _by_label(rows):
    return {row[0]: row[1:] for row in rows}


def test_cells_are_mean_sample_std_n_and_the_student_t_interval():
    text = leaderboard.build(RECORDS, "qatbench leaderboard runs/")["toy"]
    metric = _by_label(_table(text, "method", "FP"))
    assert metric["fp"] == ["91.00 ± 1.41 (2) [78.29, 103.71]", "—", "—"]  # t(0.975, 1) = 12.706
    # ste b2: 80, 84, 82: mean 82, s 2, half-width t(0.975, 2) * 2 / sqrt(3) = 4.302653 * 1.154701 = 4.9683
    assert "82.00 ± 2.00 (3) [77.03, 86.97]" in metric["ste"][2]
    table = leaderboard.cells(RECORDS).set_index(["row", "bits"])
    assert table.loc[("ste", "2"), "ci_low"] == pytest.approx(82 - 4.968275, abs=1e-5)
    assert table.loc[("ste", "2"), "ci_high"] == pytest.approx(82 + 4.968275, abs=1e-5)
    assert "Student t" in text and "95% confidence interval" in text


def test_bold_is_the_best_mean_and_every_cell_not_told_apart_from_it_after_holm():
    from qatbench import stats

    text = leaderboard.build(RECORDS, "x")["toy"]
    metric = _by_label(_table(text, "method", "FP"))
    assert metric["parq"][2] == "**86.00 ± 1.41 (2) [73.29, 98.71]**"  # the best 2-bit mean
    # parq ran seeds 0, 1; ste and talr seeds 0, 1, 2: Welch's test against parq, the paired test between them
    summary = {row: stats.summarize(v) for row, v in (("parq", [85.0, 87.0]), ("ste", [80.0, 84.0, 82.0]),
                                                         ("talr", [70.0, 70.5, 69.5]))}
    welch_ste, welch_talr = (stats.welch_p(summary["parq"], summary[row]) for row in ("ste", "talr"))
    assert welch_ste == pytest.approx(0.08244, abs=1e-4) and welch_talr == pytest.approx(0.02712, abs=1e-4)
    paired = stats.paired_p([80.0, 84.0, 82.0], [70.0, 70.5, 69.5])
    holm = stats.holm({"ste": welch_ste, "talr": welch_talr, "ste-talr": paired})
    assert holm == pytest.approx({"ste": welch_ste, "talr": 2 * welch_talr, "ste-talr": 3 * paired})
    table = leaderboard.cells(RECORDS).set_index(["row", "bits"])
    assert table.loc[("ste", "2"), "p_vs_best"] == pytest.approx(holm["ste"], abs=1e-4)
    assert table.loc[("talr", "2"), "p_vs_best"] == pytest.approx(holm["talr"], abs=1e-4)  # 0.054: not decided
    assert table.loc[("ste", "2"), "test_vs_best"] == "Welch"
    assert metric["ste"][2].startswith("**82.00") and metric["talr"][2].startswith("**70.00")
    assert not table["significant_vs_best"].to_dict()[("talr", "2")]
    assert "- 2 bits: parq has the best mean; ste and talr are not told apart from it (1 of 3 pairs decided at " \
           "0.05, Holm)." in text
    assert "Holm's method" in text and "paired t-test over the seeds" in text and "Welch" in text


def test_paired_seeds_decide_what_unpaired_ones_cannot():
    # b trails a by about 1 point on every seed while the seeds move both by several points
    a, b = [84.0, 88.0, 80.0, 86.0, 82.0], [83.1, 86.8, 79.2, 84.9, 81.0]
    paired = [*_records("ste", 2, a), *_records("parq", 2, b)]
    shifted = [*_records("ste", 2, a), *[_record("parq", 2, seed + 10, m) for seed, m in enumerate(b)]]
    decided = leaderboard.cells(paired).set_index(["row", "bits"])
    undecided = leaderboard.cells(shifted).set_index(["row", "bits"])
    assert decided.loc[("parq", "2"), "test_vs_best"] == "paired" and not decided.loc[("parq", "2"), "bold"]
    assert undecided.loc[("parq", "2"), "test_vs_best"] == "Welch" and undecided.loc[("parq", "2"), "bold"]
    assert "ste has the best mean; every other method is significantly behind it" in \
        leaderboard.build(paired, "x")["toy"]


def test_a_single_run_is_marked_and_bold_only_when_it_is_the_best():
    text = leaderboard.build(RECORDS, "x")["toy"]
    assert _by_label(_table(text, "method", "FP"))["parq"][1] == "**70.00 (1)†**"  # the only finished 1-bit run
    assert "A single run (n = 1, †) has no interval and cannot be tested" in text
    records = [_record("parq", 1, 0, 71.0), *_records("ste", 1, [70.9, 70.95, 71.0])]
    metric = _by_label(_table(leaderboard.build(records, "x")["toy"], "method", "FP"))
    assert metric["parq"][1] == "**71.00 (1)†**"
    assert not metric["ste"][1].startswith("**")  # cannot be tested against a single run: not bold


def test_without_single_runs_the_legend_does_not_mention_them():
    text = leaderboard.build(RECORDS[:10], "x")["toy"]
    assert "†" not in text


def test_delta_vs_fp_ratio_to_fp_step_and_exactness_counts():
    text = leaderboard.build(RECORDS, "x")["toy"]
    delta = _by_label(_table(text, "method", "1", "2"))
    assert delta["parq"] == ["-21.00", "-5.00"] and delta["ste"] == ["", "-9.00"]  # against FP 91
    assert "FP baseline (fp: 91.00)" in text
    cost = {(row[0], row[1]): row[2:] for row in _table(text, "method", "bits", "ms/step")}
    assert cost[("ste", "2")][:2] == ["1.500", "1.50x"]
    assert cost[("parq", "1")][:2] == ["2.000", "2.00x"] and cost[("parq", "1")][-2] == "0/1"
    assert cost[("fp", "FP")][-2] == "n/a"


def test_the_fp_baseline_is_the_unquantized_record_whatever_the_method_is_called():
    records = [*_records("float", None, [90.0, 90.0]), *_records("ste", 2, [80.0, 81.0])]
    text = leaderboard.build(records, "x")["toy"]
    assert _by_label(_table(text, "method", "FP"))["float"][0].startswith("90.00 ± 0.00 (2)")
    assert _by_label(_table(text, "method", "2"))["ste"] == ["-9.50"]


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
    assert "## 20 epochs, batch 128, sgd on cpu; hidden=10" in text and "## 5 epochs, batch 128, sgd on cpu" in text
    assert "80.00 (1)" in text and "60.00 (1)" in text


@pytest.mark.parametrize("change", [{"device_type": "cuda"}, {"task_config": {"hidden": 20}},
                                   {"recipe_config": {**SPEC["recipe_config"], "optimizer": "adamw"}},
                                   {"recipe_config": {**SPEC["recipe_config"], "batch_size": 64}}])
def test_device_task_options_optimizer_and_batch_size_are_part_of_the_budget(change):
    records = [_record("ste", 2, 0, 80.0), _record("ste", 2, 1, 60.0, **change)]
    assert leaderboard.cells(records)["section"].nunique() == 2


def test_a_method_with_its_own_lr_stays_in_the_section_of_its_fp_baseline():
    own_lr = {"recipe_config": {**SPEC["recipe_config"], "lr": 0.0002}}
    records = [*_records("fp", None, [90.0, 92.0]), *_records("ste", 2, [84.0, 86.0]),
               *_records("nspsa", 2, [60.0, 64.0], **own_lr)]
    text = leaderboard.build(records, "x")["toy"]
    assert text.count("\n## ") == 2  # one section and the provenance
    delta = _by_label(_table(text, "method", "2"))
    assert delta["nspsa (lr=0.0002)"] == ["-29.00"] and delta["ste (lr=0.02)"] == ["-6.00"]
    assert "fp (lr=0.02)" in text


def test_varying_method_configuration_gets_its_own_row():
    records = [_record("parq", 2, 0, 80.0, method_config={"anneal_end": 0.5}),
               _record("parq", 2, 0, 70.0, method_config={"anneal_end": 0.75})]
    text = leaderboard.build(records, "x")["toy"]
    assert "parq (anneal_end=0.5)" in text and "parq (anneal_end=0.75)" in text


def test_settings_shared_by_every_row_are_named_once_above_the_table():
    text = leaderboard.build(RECORDS, "x")["toy"]
    assert "Shared by every row: recipe paper, lr 0.02, scheme uniform, granularity channel" in text


def test_lower_is_better_metrics_bold_the_lowest():
    records = [_record("ste", 2, 0, 30.0), _record("parq", 2, 0, 20.0)]
    for r in records:
        r.higher_is_better, r.metric_name = False, "perplexity"
    assert "**20.00 (1)†**" in leaderboard.build(records, "x")["toy"]
    records = [*_records("ste", 2, [30.0, 31.0]), *_records("parq", 2, [20.0, 20.5]),
               *_records("fogzo", 2, [20.2, 20.6])]
    for r in records:
        r.higher_is_better, r.metric_name = False, "perplexity"
    text = leaderboard.build(records, "x")["toy"]
    metric = _by_label(_table(text, "method", "FP"))
    assert metric["parq"][1].startswith("**20.25")  # the lowest
    assert metric["fogzo"][1].startswith("**20.40")  # p = 0.69 against it
    assert metric["ste"][1].startswith("30.50")  # p = 0.010
    assert "lower is better" in text and "nats per byte" not in text
    for r in records:
        r.spec = {**r.spec, "task_config": {"tokenizer": "byte"}}
    assert "ln(perplexity) is the loss in nats per byte" in leaderboard.build(records, "x")["toy"]


def test_cost_table_shows_training_state_step_rss_increase_and_packed_size_on_cpu():
    memory = {"state_bytes": {"total": 3 * MB}, "peak_rss_increase_mb": 170.0, "step_rss_increase_mb": 42.4,
              "peak_rss_mb": 1400.0}
    export = {"packed_bytes": MB // 4, "fp32_bytes": 4 * MB}
    records = [_record("ste", 2, s, 80.0, memory=memory, export=export, train_s=12.0) for s in range(2)]
    text = leaderboard.build(records, "x")["toy"]
    cost = _table(text, "method", "bits", "ms/step", "vs FP", "train s", "state MB", "step RSS +MB", "packed MB")
    assert cost[0][4:8] == ["12.0", "3.00", "42", "0.250"]
    assert "increase of the process's peak resident set size" in text and "peak reserved" not in text


def test_cost_table_shows_allocated_and_reserved_peaks_on_cuda():
    memory = {"state_bytes": {"total": MB}, "peak_allocated_mb": 510.0, "peak_reserved_mb": 600.0}
    records = [_record("ste", 2, 0, 80.0, memory=memory, device_type="cuda")]
    text = leaderboard.build(records, "x")["toy"]
    cost = _table(text, "method", "bits", "ms/step", "vs FP", "train s", "state MB", "peak alloc MB",
                  "peak reserved MB")
    assert cost[0][5:8] == ["1.00", "510", "600"]
    assert "torch.cuda.max_memory_allocated" in text


def test_records_without_memory_timing_or_export_fields_leave_empty_cells():
    record = _record("ste", 2, 0, 80.0, memory={})
    record.timing, record.export = {}, None
    cost = _table(leaderboard.build([record], "x")["toy"], "method", "bits", "ms/step")
    assert cost[0][2:8] == ["", "", "", "", "", ""]


def test_write_makes_one_file_per_task_and_an_index_linking_the_other_pages(tmp_path):
    (tmp_path / "performance.md").write_text("# speed")
    paths = leaderboard.write(RECORDS, tmp_path, "x")
    assert sorted(p.name for p in paths) == ["README.md", "toy.md"]
    index = (tmp_path / "README.md").read_text()
    assert "[toy](toy.md)" in index and "[performance.md](performance.md)" in index


def test_no_records_is_an_error():
    with pytest.raises(QatbenchError, match="no run records"):
        leaderboard.build([], "x")
    with pytest.raises(QatbenchError, match="no run records"):
        leaderboard.render([], "csv", "x")


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


def test_metric_figures_are_written_and_linked_only_when_their_data_exist(tmp_path):
    pytest.importorskip("matplotlib")
    export = {"packed_bytes": MB // 8, "fp32_bytes": MB}
    records = [*_records("fp", None, [90.0, 91.0], export=export, train_s=10.0),
               *_records("ste", 2, [80.0, 82.0], export=export, train_s=12.0),
               *_records("ste", 4, [85.0, 86.0], export=export, train_s=12.5)]
    leaderboard.write(records, tmp_path / "with", "x")
    text = (tmp_path / "with" / "toy.md").read_text()
    for kind, alt in (("bits", "top1 against bit width"), ("time", "top1 against training time"),
                      ("size", "top1 against model size")):
        assert (tmp_path / "with" / f"toy-{kind}-1.png").read_bytes()[:4] == b"\x89PNG"
        assert f"![{alt}](toy-{kind}-1.png)" in text
    leaderboard.write(RECORDS, tmp_path / "without", "x")  # no training time, no export
    assert sorted(p.name for p in (tmp_path / "without").glob("*.png")) == ["toy-bits-1.png"]
    assert "toy-size-1.png" not in (tmp_path / "without" / "toy.md").read_text()


def test_csv_has_one_row_per_cell_with_statistics_verdicts_and_cost():
    text = leaderboard.render(RECORDS, "csv", "x")["toy"]
    table = pd.read_csv(io.StringIO(text)).set_index(["row", "bits"])
    assert len(table) == 5  # fp, ste 2, parq 1 and 2, talr 2 (the diverged run is no cell)
    assert set(leaderboard.CELL_COLUMNS) == {*table.columns, "row", "bits"}
    ste = table.loc[("ste", "2")]
    assert (ste["n"], ste["mean"], ste["std"]) == (3, 82.0, 2.0)
    assert ste["ci_high"] == pytest.approx(86.9683, abs=1e-4) and ste["delta_vs_fp"] == pytest.approx(-9.0)
    assert bool(ste["bold"]) and bool(table.loc[("talr", "2"), "bold"])  # Holm: talr not told apart from parq
    assert table.loc[("talr", "2"), "decision"].startswith("2 bits: parq has the best mean")
    assert ste["step_ms"] == 1.5


def test_json_loads_as_one_object_per_cell_with_nulls_for_missing_values():
    rows = json.loads(leaderboard.render(RECORDS, "json", "x")["toy"])
    parq1 = next(r for r in rows if r["row"] == "parq" and r["bits"] == "1")
    assert parq1["n"] == 1 and parq1["std"] is None and parq1["ci_low"] is None and parq1["bold"] is True
    assert parq1["p_vs_best"] is None and parq1["significant_vs_best"] is False and parq1["packed_mb"] is None


def test_latex_is_a_booktabs_tabular_with_bold_cells_and_escaped_labels():
    records = [*RECORDS, _record("ste", 2, 5, 81.0, method_config={"grad_scale": 1})]
    text = leaderboard.render(records, "latex", "qatbench leaderboard runs/")["toy"]
    assert "\\begin{tabular}{lccc}" in text and "\\toprule" in text and "\\bottomrule" in text
    assert "\\textbf{86.00 $\\pm$ 1.41 (2)}" in text and "\\textbf{70.00 (1)$^\\dagger$}" in text
    assert "81.00 (1)$^\\dagger$" in text and "\\textbf{81.00" not in text  # a single run, not the best
    assert "grad\\_scale=1" in text and "Welch" in text


def test_unknown_format_is_an_error(tmp_path):
    with pytest.raises(QatbenchError, match="valid: md, csv, json, latex"):
        leaderboard.render(RECORDS, "html", "x")
    with pytest.raises(QatbenchError, match="unknown leaderboard format"):
        leaderboard.write(RECORDS, tmp_path, "x", fmt="xlsx")


def test_write_in_other_formats_writes_one_file_per_task_and_no_index(tmp_path):
    paths = leaderboard.write(RECORDS, tmp_path, "x", fmt="latex")
    assert [p.name for p in paths] == ["toy.tex"] and not (tmp_path / "README.md").exists()


def test_published_numbers_are_shown_beside_and_labelled():
    records = [_record("parq", 2, 0, 91.0, task="cifar10-resnet20")]
    text = leaderboard.build(records, "x")["cifar10-resnet20"]
    assert "### Published numbers (not measured here)" in text and "FP 91.82" in text and "91.71 ± 0.03" in text
    assert "-0.71 (n = 1; paper 91.71 ± 0.03)" in text


def test_difference_to_the_paper_and_whether_its_mean_lies_in_our_interval():
    records = [*_records("fp", None, [91.8, 91.9], task="cifar10-resnet20"),
               *_records("parq", 2, [91.6, 91.7, 91.8], task="cifar10-resnet20"),
               *_records("ste", 2, [90.0, 90.1, 90.2], task="cifar10-resnet20")]
    text = leaderboard.build(records, "x")["cifar10-resnet20"]
    paper = _by_label(_table(text.split("Against the published numbers")[1], "method", "FP", "2"))
    assert paper["parq"] == ["", "-0.01 (inside; paper 91.71 ± 0.03)"]
    assert paper["ste"] == ["", "-1.12 (outside; paper 91.22 ± 0.15)"]
    assert paper["fp"] == ["+0.03 (inside; paper 91.82)", ""]
    table = leaderboard.cells(records).set_index(["row", "bits"])
    assert table.loc[("ste", "2"), "paper_mean"] == 91.22
    assert table["paper_in_ci"].to_dict() == {("fp", "FP"): True, ("parq", "2"): True, ("ste", "2"): False}


def test_without_matplotlib_the_tables_are_written_and_no_figure(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    export = {"packed_bytes": MB // 8, "fp32_bytes": MB}
    records = [_record("ste", 2, s, 80.0 + s, export=export, train_s=1.0) for s in range(2)]
    leaderboard.write(records, tmp_path, "x")
    assert not list(tmp_path.glob("*.png")) and "![" not in (tmp_path / "toy.md").read_text()


def test_an_epoch_cap_is_part_of_the_budget():
    smoke = {"recipe": "smoke", "recipe_config": {**SPEC["recipe_config"], "epochs": 1, "epoch_steps": 20}}
    short = {"recipe": "short", "recipe_config": {**SPEC["recipe_config"], "epochs": 1}}
    records = [_record("ste", 2, 0, 60.0, **smoke), _record("parq", 2, 0, 80.0, **short)]
    text = leaderboard.build(records, "x")["toy"]
    assert "## 1 epochs of at most 20 steps, batch 128" in text and "## 1 epochs, batch 128" in text


def test_every_identity_option_is_a_row_setting():
    records = [_record("ste", 2, 0, 80.0, threads=1), _record("ste", 2, 0, 79.0, threads=2)]
    rows = _by_label(_table(leaderboard.build(records, "x")["toy"], "method", "FP"))
    assert set(rows) == {"ste (threads=1)", "ste (threads=2)"}  # two configurations, not one seed counted twice


def test_a_w_a_run_shares_its_methods_row_and_learned_steps_name_themselves():
    activations = {"activations": {"bits": 2, "form": "lsq", "init": "lsq", "trained": True}}
    learned = {"bits": 2, "scheme": "uniform", "granularity": "channel", "scale": "learned", "step_init": "lsq"}
    estimated_steps = {"lr": None, "momentum": None, "weights": "estimated"}
    records = [_record("ste", 2, 0, 84.0),
               _record("ste", 2, 0, 82.0, **activations, steps=estimated_steps),
               _record("ste", 2, 0, 83.0, **activations, steps={**estimated_steps, "weights": "learned"},
                       quantizer=learned)]
    rows = _by_label(_table(leaderboard.build(records, "x")["toy"], "method", "FP", "2", "2/2"))
    assert {label: [c.strip("*†") for c in cells[1:]] for label, cells in rows.items()} == {
        "ste": ["84.00 (1)", "82.00 (1)"], "ste (weight_steps=learned)": ["—", "83.00 (1)"]}
    # every run learned: still named, though nothing varies
    rows = _by_label(_table(leaderboard.build(records[2:], "x")["toy"], "method", "FP", "2/2"))
    assert set(rows) == {"ste (weight_steps=learned)"}


def test_runs_of_one_column_that_differ_in_their_steps_settings_get_rows_of_their_own():
    """A method's own step settings (TALR's lr 0.01) are unsaid until they vary between its runs; two W+A runs
    that differ only in where their activation steps start are two rows, not one cell of two records."""
    talr = {"lr": 0.01, "momentum": 0.0, "weights": "estimated"}
    records = [_record("talr", 2, 0, 70.0, activations={"bits": 2, "form": "lsq", "init": "3std", "trained": True},
                       steps=talr),
               _record("talr", 2, 0, 71.0, activations={"bits": 2, "form": "lsq", "init": "lsq", "trained": True},
                       steps=talr),
               _record("talr", 2, 0, 72.0, activations={"bits": 2, "form": "lsq", "init": "lsq", "trained": True},
                       steps={**talr, "lr": 0.02})]
    rows = _by_label(_table(leaderboard.build(records, "x")["toy"], "method", "FP", "2/2"))
    assert set(rows) == {"talr (act_step_init=3std, step_lr=0.01)", "talr (act_step_init=lsq, step_lr=0.01)",
                         "talr (act_step_init=lsq, step_lr=0.02)"}
    rows = _by_label(_table(leaderboard.build(records[:1], "x")["toy"], "method", "FP", "2/2"))
    assert set(rows) == {"talr"}


def _written(folder, records):
    """Records written as files (as runs write them), read back with their sources."""
    from qatbench.results import RUN_ID, load_records

    for i, record in enumerate(records):
        if not RUN_ID.fullmatch(record.run_id):
            record.run_id = f"{i + 1:012x}"
        (folder / f"{i}.json").write_text(record.to_json())
    return load_records([folder])


def test_two_results_of_one_run_are_a_conflict_shown_not_dropped(tmp_path):
    first, second = _record("ste", 2, 0, 80.0), _record("ste", 2, 0, 79.5)
    first.run_id = second.run_id = "0123456789ab"
    with pytest.warns(UserWarning, match="run 0123456789ab has two results"):
        records = _written(tmp_path, [first, second, _record("ste", 2, 1, 81.0)])
    assert len(records) == 3
    with pytest.raises(QatbenchError, match="nothing recorded explains it .*80.0 in .*0.json; 79.5 in .*1.json"
                                            ".*--allow-conflicts"), pytest.warns(UserWarning, match="conflict"):
        leaderboard.build(records, "x")
    with pytest.warns(UserWarning, match="conflict"):
        text = leaderboard.build(records, "x", allow_conflicts=True)["toy"]
    assert "## Conflicts" in text and "80.0000 (0.json); 79.5000 (1.json)" in text and "unexplained" in text
    assert "80.50 ± 0.71 (2)" in text  # seeds 0 (its first record) and 1: each seed once


def test_a_conflict_explained_by_the_environment_is_published_and_listed(tmp_path):
    first, second = _record("ste", 2, 0, 80.0), _record("ste", 2, 0, 79.5)
    first.run_id = second.run_id = "0123456789ab"
    second.environment = {**second.environment, "torch": "2.11.0"}
    with pytest.warns(UserWarning):
        text = leaderboard.build(_written(tmp_path, [first, second]), "x")["toy"]
    conflicts = _table(text, "cell and seed")
    assert conflicts[0][1:] == ["80.0000 (0.json); 79.5000 (1.json)", "torch"] and "80.00 (1)" in text


def test_a_copy_of_a_record_counts_once_and_is_no_conflict(tmp_path):
    record = _record("ste", 2, 0, 80.0)
    record.run_id = "0123456789ab"
    with pytest.warns(UserWarning, match="counted once"):
        records = _written(tmp_path, [record, record])
    assert len(records) == 1 and "## Conflicts" not in leaderboard.build(records, "x")["toy"]


def test_write_removes_the_figures_of_sections_that_are_gone(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "toy-transitions-2.png").write_bytes(b"\x89PNG stale")
    (tmp_path / "notes.png").write_bytes(b"someone's")
    records = [_record("ste", 2, s, 80.0) for s in range(2)]
    for r in records:
        r.history = [{"epoch": 1, "transition_rate": 0.01}]
    leaderboard.write(records, tmp_path, "x")
    assert (tmp_path / "toy-transitions-1.png").exists() and not (tmp_path / "toy-transitions-2.png").exists()
    assert (tmp_path / "notes.png").exists()  # not a figure of ours


def test_reference_rows_are_set_against_qatbenchs_rule_over_paired_seeds():
    ours, theirs = [84.0, 85.0, 83.0, 84.5], [84.1, 84.9, 83.2, 84.4]
    records = [*_records("parq", 2, ours), *_records("torchao-parq", 2, theirs), *_records("ste", 2, ours)]
    text = leaderboard.build(records, "x")["toy"]
    [row] = _table(text, "qatbench", "reference")
    assert row[:5] == ["parq", "torchao-parq", "2", "84.12", "84.15"] and row[6] == "paired"
    assert row[5].startswith("-0.03 [") and row[8] == "not told apart"
    far = [*_records("parq", 2, ours), *_records("torchao-parq", 2, [x - 2.0 + 0.01 * i for i, x in enumerate(ours)])]
    [row] = _table(leaderboard.build(far, "x")["toy"], "qatbench", "reference")
    assert row[8].startswith("differ (p = ")
    assert "qatbench against the PARQ authors' reference" not in leaderboard.build(RECORDS, "x")["toy"]


def test_reference_rows_are_not_ranked_in_the_columns_family():
    ours, theirs = [84.0, 85.0, 83.0, 84.5], [84.3, 85.2, 83.3, 84.7]
    table = leaderboard.cells([*_records("parq", 2, ours), *_records("torchao-parq", 2, theirs),
                               *_records("ste", 2, [x - 0.5 for x in ours])]).set_index(["row", "bits"])
    assert table.loc[("parq", "2"), "is_best"] and not table.loc[("torchao-parq", "2"), "bold"]
    assert table.loc[("torchao-parq", "2"), "decision"] is None and "torchao" not in table.loc[("parq", "2"), "decision"]


def test_each_row_says_its_hyper_parameters_and_where_they_come_from(monkeypatch):
    known = {"recipe": {"source": "paper", "note": "the toy paper's schedule"},
             "methods": {"ste": {"source": "none", "note": "no settings"},
                         "talr": {"source": "borrowed", "note": "lambda from another task"}}}
    monkeypatch.setattr(leaderboard, "hyperparameters", lambda task: known if task == "toy" else {})
    learned = {"bits": 2, "scheme": "uniform", "granularity": "channel", "scale": "learned", "step_init": "lsq"}
    records = [*RECORDS[:4], *_records("talr", 2, [70.0, 70.5, 69.5], method_config={"rate_scale": 0.004}),
               _record("ste", 2, 0, 83.0, quantizer=learned, steps={"lr": None, "momentum": None, "weights": "learned"})]
    text = leaderboard.build(records, "x")["toy"]
    rows = _by_label(_table(text, "row", "lr"))
    assert rows["talr ⚑"] == ["0.02", "rate_scale=0.004", "-", "borrowed", "lambda from another task"]
    assert rows["ste"] == ["0.02", "-", "-", "none", "no settings"]
    assert rows["ste (weight_steps=learned)"] == ["0.02", "-", "weight_steps=learned, step_init=lsq, step_lr=recipe, "
                                                  "step_momentum=recipe", "none", "no settings"]
    assert "The recipe every row shares (paper): the toy paper's schedule." in text
    assert "talr ⚑" in _by_label(_table(text, "method", "FP"))  # marked in the metric table too
    monkeypatch.setattr(leaderboard, "hyperparameters", lambda task: {})
    assert "Hyper-parameters of each row" not in leaderboard.build(records, "x")["toy"]
