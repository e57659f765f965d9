"""Small LLaMA models (Hugging Face `LlamaForCausalLM`, built from a config, no weights) on a text corpus.

transformers is an optional extra (`pip install 'qatbench[llm]'`); without it these tasks
say so in one line when they are run.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from qatbench.batches import rank_part
from qatbench.data import DataSource
from qatbench.distributed import reduce_tensor_
from qatbench.errors import QatbenchError
from qatbench.params import param
from qatbench.registry import TASKS
from qatbench.task import Recipe, Task, TaskData
from qatbench.text import HOW_TO_GET_TEXT, corpus_files, load_tokenizer, load_tokens

BLOCK_WEIGHTS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                 "gate_proj.weight", "up_proj.weight", "down_proj.weight")


@dataclasses.dataclass(frozen=True)
class LlamaSize:
    hidden: int
    layers: int
    heads: int
    intermediate: int

    def parameters(self, vocab: int) -> int:
        """Untied input and output embeddings, 4 attention and 3 MLP matrices and 2 RMSNorms per layer, a final norm."""
        h = self.hidden
        return 2 * vocab * h + self.layers * (4 * h * h + 3 * h * self.intermediate + 2 * h) + h


@dataclasses.dataclass(frozen=True)
class LlamaTaskConfig:
    tokenizer: str = param("byte", "byte (vocabulary 256, nothing to download) or a Hugging Face tokenizer name/path")
    seq_len: int = param(512, "context length of the training windows and the evaluation windows", ge=2)
    steps_per_epoch: int = param(200, "training steps between evaluations (an 'epoch' of a language-model run)", ge=1)
    val_fraction: float = param(0.01, "held-out share of the token stream when the corpus has no validation split",
                                gt=0, lt=1)
    quantize_embeddings: bool = param(False, "also quantize the input embedding")
    quantize_head: bool = param(False, "also quantize the output head")
    hidden: int = param(0, "width of the model (0: the size's own)", ge=0)
    layers: int = param(0, "decoder layers (0: the size's own)", ge=0)
    heads: int = param(0, "attention heads (0: the size's own; they must divide the width)", ge=0)
    intermediate: int = param(0, "width of the MLP (0: the size's own)", ge=0)


class TokenWindows:
    """`steps` batches of random contiguous windows of `seq_len + 1` tokens (inputs, next-token targets).

    The windows' starts are drawn from `generator` batch by batch, so a resumed epoch needs only how
    many batches were taken (`state_dict`) and the generator's state (saved by the harness)."""

    def __init__(self, tokens: Tensor, batch_size: int, seq_len: int, steps: int, generator: torch.Generator) -> None:
        if len(tokens) <= seq_len + 1:
            raise QatbenchError(f"the training split has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
        self.tokens, self.batch_size, self.seq_len, self.steps, self.generator = tokens, batch_size, seq_len, steps, generator
        self.offsets = torch.arange(seq_len + 1, device=tokens.device)
        self.rank, self.world = 0, 1
        self._position, self._resume = 0, False

    def shard(self, rank: int, world: int) -> None:
        """Draw every global batch's windows, keep this rank's part: disjoint windows, as one process draws them."""
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        high = len(self.tokens) - self.seq_len - 1
        if not self._resume:
            self._position = 0
        self._resume = False
        while self._position < self.steps:
            self._position += 1
            starts = torch.randint(0, high + 1, (self.batch_size,), generator=self.generator,
                                   device=self.generator.device).to(self.tokens.device)
            starts = rank_part(starts, self.rank, self.world)
            windows = self.tokens[starts[:, None] + self.offsets].long()
            yield windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return {"position": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._position, self._resume = int(state["position"]), True


class HeldOutWindows:
    """The whole held-out stream in order: consecutive windows of `seq_len` predictions, the last one shorter."""

    def __init__(self, tokens: Tensor, batch_size: int, seq_len: int) -> None:
        if len(tokens) < 2:
            raise QatbenchError(f"the held-out split has {len(tokens)} tokens; it needs at least 2")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.rank, self.world = 0, 1

    def shard(self, rank: int, world: int) -> None:
        """Evaluate this rank's part of each batch; the ranks' sums together cover every token once."""
        self.rank, self.world = rank, world

    @property
    def num_predictions(self) -> int:
        return len(self.tokens) - 1

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        full = self.num_predictions // self.seq_len
        for first in range(0, full, self.batch_size):
            count = min(self.batch_size, full - first)
            block = self.tokens[first * self.seq_len: (first + count) * self.seq_len + 1].long()
            inputs = block[:-1].view(count, self.seq_len)
            targets = block[1:].view(count, self.seq_len)
            yield inputs, targets
        tail = self.tokens[full * self.seq_len:].long()
        if len(tail) > 1:
            yield tail[None, :-1], tail[None, 1:]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for inputs, targets in self._batches():
            inputs, targets = rank_part(inputs, self.rank, self.world), rank_part(targets, self.rank, self.world)
            if len(inputs):
                yield inputs, targets


def _transformers():
    try:
        import transformers
    except ImportError:
        raise QatbenchError("the llama tasks need transformers: pip install 'qatbench[llm]'") from None
    return transformers


class LlamaTask(Task):
    """LLaMA (`LlamaForCausalLM` from a config) trained from scratch on a text corpus; metric: perplexity.

    Perplexity is `exp` of the mean next-token cross-entropy over every token of the
    held-out split (consecutive windows; lower is better). Training draws random
    contiguous windows of `seq_len + 1` tokens from the training split, which lives on
    the device as a flat token tensor, tokenized once and cached. Quantized per channel:
    the q/k/v/o projections and the gate/up/down MLP matrices of every layer; the
    embedding, the norms and the output head stay full precision (task options
    `quantize_embeddings`, `quantize_head`). With `--act-bits A`, the input of every quantized block
    linear is quantized too, signed (FOGZO's W/A LLaMA). Recipes: AdamW (betas 0.9/0.95, wd 0.1),
    linear warm-up, cosine decay to 10% of the peak, gradient clipping at 1.0, bf16
    autocast on CUDA; `smoke` is 20 steps of batch 8.
    """

    Config = LlamaTaskConfig
    metric = "perplexity"
    higher_is_better = False
    default_granularity = "channel"
    size: ClassVar[LlamaSize] = LlamaSize(256, 8, 4, 688)
    eval_logits_bytes: ClassVar[int] = 1 << 30  # the evaluation's bound on its logits alive at once

    def __init__(self, config: LlamaTaskConfig) -> None:
        super().__init__(config)
        _transformers()  # a missing extra is said before any data is looked for
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.tokenizer)
        return self._tokenizer

    sample_options = {"seq_len": 32, "steps_per_epoch": 3, "val_fraction": 0.05, "hidden": 64, "layers": 2,
                      "heads": 2, "intermediate": 128}

    @classmethod
    def write_sample(cls, folder: Path, sentences: int = 1500, seed: int = 0) -> Path:
        """A generated English-like corpus, `folder/corpus.txt`: a small grammar, so that a model can lower its
        perplexity; the corpus file is what `--data-root` takes."""
        generator = torch.Generator().manual_seed(seed)
        subjects, verbs = ["the cat", "a dog", "my friend", "the old man"], ["sees", "likes", "finds"]
        objects = ["the ball", "a red house", "the river", "some bread"]

        def pick(words: list[str]) -> str:
            return words[torch.randint(len(words), (1,), generator=generator).item()]

        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "corpus.txt"
        path.write_text("\n".join(f"{pick(subjects)} {pick(verbs)} {pick(objects)}." for _ in range(sentences)))
        return path

    @property
    def model_size(self) -> LlamaSize:
        """The size, with the task options' overrides (hidden, layers, heads, intermediate) where given."""
        config, size = self.config, self.size
        size = LlamaSize(config.hidden or size.hidden, config.layers or size.layers, config.heads or size.heads,
                         config.intermediate or size.intermediate)
        if size.hidden % size.heads:
            raise QatbenchError(f"task {self.name!r}: {size.heads} heads do not divide the width {size.hidden}")
        return size

    def build_model(self) -> nn.Module:
        transformers = _transformers()
        size = self.model_size
        config = transformers.LlamaConfig(
            vocab_size=self.tokenizer.vocab_size, hidden_size=size.hidden, intermediate_size=size.intermediate,
            num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
            max_position_embeddings=self.config.seq_len, tie_word_embeddings=False,
            use_cache=False)  # no key/value cache: training and evaluation see whole windows, nothing is generated
        return transformers.LlamaForCausalLM(config)

    def is_quantized(self, name: str, parameter: nn.Parameter) -> bool:
        if name.endswith(BLOCK_WEIGHTS):
            return True
        return (self.config.quantize_embeddings and name.endswith("embed_tokens.weight")) or \
            (self.config.quantize_head and name == "lm_head.weight")

    def activation_inputs(self, model: nn.Module) -> list[tuple[nn.Module, bool]]:
        """The input of every quantized block linear (FOGZO's W/A LLaMA: embeddings and head in full precision),
        signed (RMSNorm outputs, attention outputs, the MLP's gated product)."""
        names = tuple(name.removesuffix(".weight") for name in BLOCK_WEIGHTS)
        return [(module, True) for name, module in model.named_modules() if name.endswith(names)]

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.layers)  # one FSDP unit per decoder layer; the root holds embeddings and head

    def tokens_per_sample(self) -> int:
        return self.config.seq_len

    def loss(self, output, target: Tensor) -> Tensor:
        logits = output.logits if hasattr(output, "logits") else output
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten())

    def eval_rows(self, seq_len: int) -> int:
        """Windows per evaluation forward: as many as keep their fp32 logits (rows x seq_len x vocabulary x 4
        bytes) within `eval_logits_bytes`, at least one. At a 32k vocabulary a 512-token window's logits
        take 64 MiB, so the recipe's batch of 256 is evaluated 16 windows at a time."""
        return max(1, self.eval_logits_bytes // (seq_len * self.tokenizer.vocab_size * 4))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches) -> float:
        """exp(mean next-token cross-entropy over the whole held-out split), the logits of at most
        `eval_rows` windows alive at once."""
        was_training = model.training
        model.eval()
        sums = None  # (summed loss, tokens), float64 on the device
        for batch_inputs, batch_targets in batches:
            rows = self.eval_rows(batch_inputs.shape[1])
            for inputs, targets in zip(batch_inputs.split(rows), batch_targets.split(rows)):
                logits = model(inputs).logits
                summed = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                                     reduction="sum")
                part = torch.stack([summed.double(), summed.new_tensor(targets.numel(), dtype=torch.float64)])
                sums = part if sums is None else sums + part
        model.train(was_training)
        total, count = reduce_tensor_(sums).tolist()
        return math.exp(total / count)

    def locate_data(self, data_root, download) -> DataSource:
        corpus = data_root or (Path(os.environ["QATBENCH_DATA"]) if os.environ.get("QATBENCH_DATA") else None)
        if corpus is None:
            raise QatbenchError(f"task {self.name!r} needs a text corpus. {HOW_TO_GET_TEXT}")
        corpus = Path(corpus).expanduser()
        if not corpus.exists():
            raise QatbenchError(f"corpus {str(corpus)!r} does not exist. {HOW_TO_GET_TEXT}")
        return DataSource("text corpus", corpus, tuple(corpus_files(corpus)))

    def load_data(self, source, device, batch_size, generator) -> TaskData:
        train, val = load_tokens(source.root, self.tokenizer, self.config.val_fraction)
        train, val = train.to(device), val.to(device)
        held_out = HeldOutWindows(val, batch_size, self.config.seq_len)
        return TaskData(train=TokenWindows(train, batch_size, self.config.seq_len, self.config.steps_per_epoch,
                                           generator),
                        test=held_out, num_train=len(train), num_test=held_out.num_predictions)


def _recipes(lr: float, epochs: int, batch_size: int) -> dict[str, Recipe]:
    common = {"optimizer": "adamw", "weight_decay": 0.1, "betas": (0.9, 0.95), "grad_clip": 1.0,
              "cuda_precision": "bf16"}
    return {
        "smoke": Recipe(epochs=1, batch_size=8, lr=lr, lr_schedule="constant", epoch_steps=20, **common),
        "short": Recipe(epochs=max(1, epochs // 10), batch_size=batch_size, lr=lr, warmup_epochs=0.5,
                        min_lr=lr / 10, **common),
        "paper": Recipe(epochs=epochs, batch_size=batch_size, lr=lr, warmup_epochs=epochs / 10, min_lr=lr / 10,
                        **common),
    }


def _register(name: str, size: LlamaSize, lr: float, epochs: int, batch_size: int,
              recipes: dict[str, Recipe] | None = None, config: type = LlamaTaskConfig, note: str = "") -> None:
    doc = (f"LLaMA {size.hidden} wide, {size.layers} layers, {size.heads} heads, MLP {size.intermediate} "
           f"({size.parameters(32000) / 1e6:.1f}M parameters with a 32k vocabulary, "
           f"{size.parameters(256) / 1e6:.2f}M with the byte tokenizer). {note}" + LlamaTask.__doc__)
    cls = type(name.replace("-", "_"), (LlamaTask,), {"__doc__": doc, "size": size, "Config": config,
                                                       "recipes": recipes or _recipes(lr, epochs, batch_size)})
    TASKS.register(name)(cls)


@dataclasses.dataclass(frozen=True)
class CpuLlamaTaskConfig(LlamaTaskConfig):
    """llama-1m's defaults: nanoGPT's CPU-sized context and an evaluation every 500 steps."""

    seq_len: int = param(64, "context length of the training windows and the evaluation windows", ge=2)
    steps_per_epoch: int = param(500, "training steps between evaluations (an 'epoch' of a language-model run)", ge=1)


def _cpu_recipes() -> dict[str, Recipe]:
    """llama-1m's recipes, sized for one CPU core (nanoGPT's CPU Shakespeare settings: AdamW 1e-3 with 100 warm-up
    steps and a cosine to 1e-4, batch 12 x 64 tokens, 2,000 steps)."""
    common = {"optimizer": "adamw", "weight_decay": 0.1, "betas": (0.9, 0.99), "grad_clip": 1.0,
              "cuda_precision": "bf16", "lr": 1e-3, "min_lr": 1e-4}
    return {
        "smoke": Recipe(epochs=1, batch_size=8, lr_schedule="constant", epoch_steps=20,
                        **{**common, "min_lr": 0.0}),
        "short": Recipe(epochs=4, batch_size=12, warmup_epochs=0.2, **common),
        "paper": Recipe(epochs=4, batch_size=12, warmup_epochs=0.2, **common),
    }


# Sizes: widths, depths and MLP widths of the GaLore/FOGZO LLaMA family, named by their
# parameter count with a 32,000-token vocabulary. Paper budgets: epochs of 200 steps.
_register("llama-1m", LlamaSize(128, 4, 4, 352), lr=1e-3, epochs=4, batch_size=12, recipes=_cpu_recipes(),
          config=CpuLlamaTaskConfig, note="A CPU size (nanoGPT's CPU Shakespeare model as a LLaMA; context 64): "
          "the language-model leaderboard's task. ")
_register("llama-20m", LlamaSize(256, 8, 4, 688), lr=1e-3, epochs=50, batch_size=64)
_register("llama-60m", LlamaSize(512, 8, 8, 1376), lr=1e-3, epochs=50, batch_size=128)
_register("llama-130m", LlamaSize(768, 12, 12, 2048), lr=1e-3, epochs=100, batch_size=256)
_register("llama-300m", LlamaSize(1024, 18, 16, 2736), lr=5e-4, epochs=150, batch_size=256)
