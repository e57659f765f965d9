"""`qatbench eval` rebuilds a run's model from its export alone and reproduces the recorded metric bit for
bit; `qatbench export` writes the export from a kept final checkpoint; `rtn` is the PTQ baseline."""

from __future__ import annotations

import pytest
import torch

from qatbench.cli import main
from qatbench.export import load_export
from qatbench.quant import QuantizerConfig, as_rows, estimate_levels, hard_quantize
from qatbench.registry import METHODS as REGISTERED
from qatbench.results import load_records
from tests.conftest import make_cifar_batches, make_image_folder, write_corpus
from tests.test_lifecycle import qatbench_process

METHODS = REGISTERED.names()  # every registered method


def _run(tmp_path, *argv):
    out = tmp_path / "runs"
    assert main(["run", *argv, "--recipe", "smoke", "--no-download", "--out", str(out)]) == 0
    return out


def _eval_reproduces(out, data_root, capsys, *extra):
    records = load_records([out])
    capsys.readouterr()
    exports = [str(out / r.task / r.export["file"]) for r in records]
    assert main(["eval", *exports, "--data-root", str(data_root), *extra]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(records)
    for record, line in zip(records, lines):
        assert f"{record.metric_name} {record.metric!r}" in line and "bit for bit" in line, line
    return records


def test_every_method_exports_a_model_that_evaluates_to_its_record(idx_root, isolated_data_env, tmp_path, capsys):
    out = _run(tmp_path, "--method", *METHODS, "--task", "mnist-mlp", "--bits", "2", "--data-root", str(idx_root),
               "--epochs", "2")
    records = _eval_reproduces(out, idx_root, capsys)
    assert sorted(r.method for r in records) == sorted(METHODS)
    for record in records:
        assert record.export["fp32_bytes"] == 4 * 7960
        if record.quantized:  # 7,940 weights at 2 bits, a table of one step per row, the two biases in fp32
            assert record.export["packed_bytes"] == 7940 * 2 // 8 + (10 + 10) * 4 + 20 * 4


def test_cifar_export_in_channels_last_per_channel_evaluates_to_its_record(isolated_data_env, tmp_path, capsys):
    root = make_cifar_batches(tmp_path / "cifar")
    out = _run(tmp_path, "--method", "parq", "rtn", "--task", "cifar10-resnet20", "--bits", "T", "3",
               "--batch-size", "16", "--channels-last", "--granularity", "channel", "--data-root", str(root))
    _eval_reproduces(out, root, capsys)


def test_image_folder_export_evaluates_to_its_record(isolated_data_env, tmp_path, capsys):
    root = make_image_folder(tmp_path / "imagenet", size=36)
    out = _run(tmp_path, "--method", "ste", "--task", "imagenet-resnet18", "--bits", "4", "--batch-size", "4",
               "--data-root", str(root), "--task-arg", "num_classes=3", "--task-arg", "image_size=32",
               "--task-arg", "workers=0")
    _eval_reproduces(out, root, capsys)


def test_language_model_export_evaluates_to_its_perplexity(isolated_data_env, tmp_path, capsys):
    pytest.importorskip("transformers")
    corpus = write_corpus(tmp_path / "corpus.txt", sentences=300)
    out = _run(tmp_path, "--method", "talr", "--task", "llama-20m", "--bits", "2", "--batch-size", "4",
               "--data-root", str(corpus), "--task-arg", "seq_len=32", "--task-arg", "steps_per_epoch=3",
               "--quantizer", "lsbq")
    _eval_reproduces(out, corpus, capsys)


def test_eval_on_other_data_says_so_and_does_not_claim_equality(idx_root, isolated_data_env, tmp_path, capsys):
    from tests.conftest import make_idx_dataset

    out = _run(tmp_path, "--method", "ste", "--task", "mnist-mlp", "--bits", "2", "--data-root", str(idx_root))
    other = make_idx_dataset(tmp_path / "other", seed=3)
    [record] = load_records([out])
    capsys.readouterr()
    assert main(["eval", str(out / "mnist-mlp" / record.export["file"]), "--data-root", str(other)]) == 0
    line = capsys.readouterr().out
    assert "bit for bit" not in line and "other data than the run's" in line


def test_export_from_a_kept_final_checkpoint_rebuilds_the_same_model(idx_root, isolated_data_env, tmp_path, capsys):
    out = _run(tmp_path, "--method", "parq", "--task", "mnist-mlp", "--bits", "4", "--data-root", str(idx_root),
               "--keep-checkpoints", "--quantizer", "lsbq")
    [path] = out.rglob("*.safetensors")
    original = load_export(path).state_dict
    path.unlink()
    [record_file] = out.rglob("*.json")
    assert main(["export", str(record_file)]) == 0
    assert "wrote" in capsys.readouterr().out
    again = load_export(path).state_dict
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    _eval_reproduces(out, idx_root, capsys)


def test_export_without_the_final_checkpoint_says_how_to_keep_it(idx_root, isolated_data_env, tmp_path, capsys):
    out = _run(tmp_path, "--method", "ste", "--task", "mnist-mlp", "--bits", "2", "--data-root", str(idx_root))
    [record_file] = out.rglob("*.json")
    capsys.readouterr()
    assert main(["export", str(record_file)]) == 2
    assert "--keep-checkpoints" in capsys.readouterr().err


def _quantized_weights(out, method):
    [record] = [r for r in load_records([out]) if r.method == method]
    return load_export(out / record.task / record.export["file"]).state_dict


def test_rtn_is_the_full_precision_model_rounded_to_its_nearest_levels(idx_root, isolated_data_env, tmp_path):
    out = _run(tmp_path, "--method", "fp", "rtn", "--task", "mnist-mlp", "--bits", "3", "--data-root", str(idx_root))
    fp, rtn = _quantized_weights(out, "fp"), _quantized_weights(out, "rtn")
    config = QuantizerConfig(bits=3, granularity="channel")
    for name in ("1.weight", "3.weight"):
        rows = as_rows(fp[name].clone(), "channel")
        expected = hard_quantize(rows, estimate_levels(rows, config), evenly_spaced=True).view_as(fp[name])
        assert torch.equal(rtn[name], expected)
    assert torch.equal(rtn["1.bias"], fp["1.bias"])


def test_rtn_from_an_init_checkpoint_with_zero_steps_is_ptq_of_it(idx_root, isolated_data_env, tmp_path):
    out = _run(tmp_path, "--method", "fp", "--task", "mnist-mlp", "--data-root", str(idx_root))
    [fp_export] = out.rglob("fp-*.safetensors")
    ptq = tmp_path / "ptq"
    assert main(["run", "--method", "rtn", "--epochs", "0", "--init", str(fp_export), "--task", "mnist-mlp",
                 "--bits", "2", "--recipe", "smoke", "--data-root", str(idx_root), "--no-download",
                 "--out", str(ptq)]) == 0
    [record] = load_records([ptq])
    assert record.status == "ok" and record.exactness["passed"] and record.history == []
    init, quantized = load_export(fp_export).state_dict, _quantized_weights(ptq, "rtn")
    rows = as_rows(init["1.weight"].clone(), "channel")
    expected = hard_quantize(rows, estimate_levels(rows, QuantizerConfig(bits=2)), evenly_spaced=True)
    assert torch.equal(quantized["1.weight"], expected.view_as(init["1.weight"]))
    # a quantized export is a valid --init too: its weights start dequantized
    assert main(["run", "--method", "ste", "--init", str(ptq / "mnist-mlp" / record.export["file"]),
                 "--task", "mnist-mlp", "--bits", "2", "--recipe", "smoke", "--data-root", str(idx_root),
                 "--no-download", "--out", str(tmp_path / "again")]) == 0


def _one_line_error(capsys, argv, message):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("qatbench: error: ") and err.count("\n") == 1 and message in err, err


def test_a_crafted_export_that_does_not_fit_the_model_is_one_line(idx_root, isolated_data_env, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qatbench.export import content_digest

    out = _run(tmp_path, "--method", "ste", "--task", "mnist-mlp", "--bits", "2", "--data-root", str(idx_root))
    [path] = out.rglob("*.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["1.bias"] = torch.zeros(11)  # a tensor of another shape, the digest rewritten to match
    save_file(tensors, str(path), metadata={**header, "digest": content_digest(header, tensors)})
    _one_line_error(capsys, ["eval", str(path), "--data-root", str(idx_root)],
                    "does not fit the model: 1.bias is torch.float32 (11,), the model's is torch.float32 (10,)")


def test_a_plugin_methods_export_evaluates_without_the_plugin(idx_root, isolated_data_env, tmp_path, capsys):
    plugin = tmp_path / "halfway.py"
    plugin.write_text("from qatbench.method import ProxMethod\nfrom qatbench.quant import hard_quantize\n"
                      "from qatbench.registry import METHODS\n\n@METHODS.register('halfway-eval')\n"
                      "class Halfway(ProxMethod):\n    def prox(self, latent, levels, t):\n"
                      "        return hard_quantize(latent, levels)\n")
    out = _run(tmp_path, "--plugin", str(plugin), "--method", "halfway-eval", "--task", "mnist-mlp", "--bits", "2",
               "--data-root", str(idx_root), "--keep-checkpoints")
    [record] = load_records([out])
    elsewhere = qatbench_process("eval", str(out / record.task / record.export["file"]), "--data-root", str(idx_root))
    output = elsewhere.communicate(timeout=120)[0]  # a process that never loaded the plugin
    assert elsewhere.returncode == 0 and f"{record.metric!r}" in output and "bit for bit" in output, output
    exporting = qatbench_process("export", record.source)  # re-finalizing needs the method: it says how
    output = exporting.communicate(timeout=120)[0]
    assert exporting.returncode == 2 and output.count("\n") == 1, output
    assert "unknown method 'halfway-eval'" in output and "pass --plugin FILE.py that defines it" in output


def test_a_crafted_final_checkpoint_is_refused_by_export_in_one_line(idx_root, isolated_data_env, tmp_path, capsys):
    from qatbench import checkpoint

    out = _run(tmp_path, "--method", "parq", "--task", "mnist-mlp", "--bits", "2", "--data-root", str(idx_root),
               "--keep-checkpoints")
    [kept] = out.rglob("*.ckpt")
    [record_file] = out.rglob("*.json")
    payload = torch.load(kept, weights_only=True)
    del payload["digest"]
    payload["model"]["1.weight"] = torch.zeros(3, 3)
    torch.save({**payload, "digest": checkpoint.digest(payload)}, kept)
    _one_line_error(capsys, ["export", str(record_file)], "does not fit run")
    kept.write_bytes(kept.read_bytes()[:-100])
    _one_line_error(capsys, ["export", str(record_file)], "is unreadable")
