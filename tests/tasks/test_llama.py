import importlib.util
import math

import pytest
import torch

from qatbench.errors import QatbenchError
from qatbench.params import build_config
from qatbench.registry import METHODS, TASKS
from qatbench.tasks.llama import HeldOutWindows, TokenWindows
from qatbench.text import ByteTokenizer, load_tokens
from tests.conftest import smoke_run, write_corpus

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed")
SIZES = {"llama-20m": 20e6, "llama-60m": 60e6, "llama-130m": 130e6, "llama-300m": 300e6}


def _task(name="llama-20m", **options):
    cls = TASKS.get(name)
    return cls(build_config(cls.Config, options, name))


def test_byte_tokenizer_round_trip():
    tokenizer = ByteTokenizer()
    text = "héllo wörld ✓"
    assert tokenizer.decode(list(tokenizer.encode(text))) == text and tokenizer.vocab_size == 256


def test_tokens_are_split_and_cached(tmp_path, isolated_data_env):
    corpus = write_corpus(tmp_path / "corpus.txt")
    train, val = load_tokens(corpus, ByteTokenizer(), 0.1)
    total = len(corpus.read_bytes()) + 2  # the document separator after the one file
    assert len(train) + len(val) == total and len(val) == round(0.1 * total)
    assert bytes(train[:7].tolist()) == corpus.read_bytes()[:7]
    assert list((tmp_path / "home/.cache/qatbench/tokens").iterdir())
    again_train, again_val = load_tokens(corpus, ByteTokenizer(), 0.1)
    assert torch.equal(again_train, train) and torch.equal(again_val, val)


def test_a_damaged_token_cache_is_detected_and_rebuilt(tmp_path, isolated_data_env):
    corpus = write_corpus(tmp_path / "corpus.txt")
    train, val = load_tokens(corpus, ByteTokenizer(), 0.1)
    [cache] = (tmp_path / "home/.cache/qatbench/tokens").iterdir()
    for damage in (b"not a torch file", cache.read_bytes()[:-40]):
        cache.write_bytes(damage)
        with pytest.warns(UserWarning, match="rebuilding the damaged token cache"):
            again_train, again_val = load_tokens(corpus, ByteTokenizer(), 0.1)
        assert torch.equal(again_train, train) and torch.equal(again_val, val)
    saved = torch.load(cache, weights_only=True)
    saved["train"][0] += 1  # loads fine, but is not what was tokenized
    torch.save(saved, cache)
    with pytest.warns(UserWarning, match="do not match their checksum"):
        assert torch.equal(load_tokens(corpus, ByteTokenizer(), 0.1)[0], train)


@pytest.mark.parametrize("content, message", [
    (b"text\x00\x01\x02binary", "is not a text file \\(it holds NUL bytes\\)"),
    (bytes(range(128, 256)) * 10, "is not UTF-8 text"),
])
def test_a_binary_file_is_not_a_corpus(tmp_path, isolated_data_env, content, message):
    corpus = tmp_path / "model.bin.txt"
    corpus.write_bytes(content)
    with pytest.raises(QatbenchError, match=message) as err:
        load_tokens(corpus, ByteTokenizer(), 0.1)
    assert str(corpus) in str(err.value)


def test_a_folder_of_text_files_is_one_corpus(tmp_path, isolated_data_env):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("first")
    (folder / "b.txt").write_text("second")
    train, val = load_tokens(folder, ByteTokenizer(), 0.1)
    assert bytes(torch.cat([train, val]).tolist()) == b"first\n\nsecond\n\n"


def test_a_folder_split_into_train_and_validation_has_that_held_out_split(tmp_path, isolated_data_env):
    for part, texts in {"train": {"a.txt": "first", "b.txt": "second"}, "validation": {"c.txt": "third"}}.items():
        (tmp_path / "split" / part).mkdir(parents=True)
        for name, text in texts.items():
            (tmp_path / "split" / part / name).write_text(text)
    train, val = load_tokens(tmp_path / "split", ByteTokenizer(), 0.5)  # val_fraction does not apply
    assert bytes(train.tolist()) == b"first\n\nsecond\n\n" and bytes(val.tolist()) == b"third\n\n"
    (tmp_path / "split" / "stray.txt").write_text("left out")
    with pytest.raises(QatbenchError, match="holds .txt files beside train/ and validation/"):
        load_tokens(tmp_path / "split", ByteTokenizer(), 0.5)
    (tmp_path / "split" / "stray.txt").unlink()
    (tmp_path / "split" / "validation" / "c.txt").unlink()
    with pytest.raises(QatbenchError, match="train/ and validation/ must each hold .txt files"):
        load_tokens(tmp_path / "split", ByteTokenizer(), 0.5)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets is not installed")
def test_a_saved_datasets_dataset_with_its_validation_split(tmp_path, isolated_data_env):
    import datasets

    saved = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["alpha", "beta"]}),
                          "validation": datasets.Dataset.from_dict({"text": ["gamma"]})}).save_to_disk(str(saved))
    train, val = load_tokens(saved, ByteTokenizer(), 0.5)
    assert bytes(train.tolist()) == b"alpha\n\nbeta\n\n" and bytes(val.tolist()) == b"gamma\n\n"


def test_training_windows_are_contiguous_and_shifted_by_one():
    tokens = torch.arange(100, dtype=torch.uint8)
    inputs, targets = next(iter(TokenWindows(tokens, 4, 8, 3, torch.Generator().manual_seed(0))))
    assert inputs.shape == (4, 8) and torch.equal(targets, inputs + 1)
    assert all(torch.equal(row, torch.arange(row[0].item(), row[0].item() + 8)) for row in inputs)


def test_held_out_windows_predict_every_token_once():
    tokens = torch.arange(50, dtype=torch.uint8)
    batches = list(HeldOutWindows(tokens, 2, 8))
    targets = torch.cat([t.flatten() for _, t in batches])
    assert targets.tolist() == list(range(1, 50))
    assert all(torch.equal(t, i + 1) for i, t in batches)


def test_perplexity_of_uniform_predictions_is_the_vocabulary_size():
    class Uniform(torch.nn.Module):
        def forward(self, inputs):
            return type("Out", (), {"logits": torch.zeros(*inputs.shape, 256)})()

    task = _task()
    value = task.evaluate(Uniform(), HeldOutWindows(torch.arange(40, dtype=torch.uint8), 2, 8))
    assert value == pytest.approx(256.0)


def test_evaluation_holds_the_logits_of_a_few_windows_at_a_time_and_sums_the_same():
    class Seen(torch.nn.Module):  # logits that depend on the input, and the largest batch it was given
        rows = 0

        def forward(self, inputs):
            Seen.rows = max(Seen.rows, len(inputs))
            logits = torch.nn.functional.one_hot(inputs.long(), 256).float() * 3.0
            return type("Out", (), {"logits": logits})()

    tokens = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    task = _task()
    whole = task.evaluate(Seen(), HeldOutWindows(tokens, 16, 8))
    assert Seen.rows == 16
    task.eval_logits_bytes = 3 * 8 * 256 * 4  # three windows' logits
    assert task.eval_rows(8) == 3
    Seen.rows = 0
    assert task.evaluate(Seen(), HeldOutWindows(tokens, 16, 8)) == pytest.approx(whole, rel=1e-6)  # fp32 sums, reassociated
    assert Seen.rows == 3


@needs_transformers
def test_the_model_keeps_no_key_value_cache():
    model = _task().build_model()
    assert model.config.use_cache is False
    output = model(torch.randint(0, 256, (2, 8)))
    assert getattr(output, "past_key_values", None) is None


@needs_transformers
@pytest.mark.parametrize("name", sorted(SIZES))
def test_parameter_count_of_each_size(name):
    task = _task(name)
    with torch.device("meta"):
        model = task.build_model()
    count = sum(p.numel() for p in model.parameters())
    assert count == task.size.parameters(256)
    assert abs(task.size.parameters(32000) - SIZES[name]) / SIZES[name] < 0.15  # the name's claim, 32k vocabulary


@needs_transformers
def test_attention_and_mlp_matrices_are_quantized_embeddings_norms_and_head_are_not():
    task = _task()
    with torch.device("meta"):
        model = task.build_model()
    chosen = [n for n, p in model.named_parameters() if task.is_quantized(n, p)]
    assert len(chosen) == 8 * 7
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in chosen)
    both = _task(quantize_embeddings=True, quantize_head=True)
    assert sum(both.is_quantized(n, p) for n, p in model.named_parameters()) == 8 * 7 + 2


@needs_transformers
@pytest.mark.parametrize("method", METHODS.names())
def test_smoke_run_of_the_smallest_model_through_the_cli(method, tmp_path, isolated_data_env):
    corpus = write_corpus(tmp_path / "corpus.txt", sentences=400)
    bits = ["--bits", "4"] if METHODS.get(method).quantizes else []
    record = smoke_run(tmp_path, "--method", method, "--task", "llama-20m", *bits, "--batch-size", "4",
                       "--task-arg", "seq_len=32", "--task-arg", "steps_per_epoch=3", "--task-arg", "val_fraction=0.05",
                       "--data-root", str(corpus))
    assert record["metric_name"] == "perplexity" and record["higher_is_better"] is False
    timing = record["timing"]
    assert timing["tokens_per_s"] == pytest.approx(timing["samples_per_s"] * 32)
    assert 1 < record["metric"] < 10 * 256 and math.isfinite(record["metric"])


@needs_transformers
def test_the_cpu_size_is_about_a_million_parameters_with_the_byte_vocabulary_and_context_64():
    task = _task("llama-1m")
    with torch.device("meta"):
        count = sum(p.numel() for p in task.build_model().parameters())
    assert count == task.size.parameters(256) == 869_504
    assert task.config.seq_len == 64 and task.recipes["short"].epochs * task.config.steps_per_epoch == 2000
