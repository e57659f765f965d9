"""TALR: transition-rate scheduling of the latent updates of quantized weights."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import Tensor

from qatbench.method import Closure, ProxConfig, ProxMethod
from qatbench.methods.ste import STE
from qatbench.params import param
from qatbench.quant import TERNARY
from qatbench.registry import METHODS


@dataclasses.dataclass(frozen=True)
class TALRConfig(ProxConfig):
    rate_scale: float = param(4e-3, "lambda: R_0 = lambda sqrt(b) (paper: lambda 4e-3..6e-3; ternary b = log2 3)",
                              gt=0)
    target_rate: float = param(0.0, "R_0 itself when > 0, overriding lambda sqrt(b)", ge=0, le=1)
    target_schedule: Literal["cosine", "constant"] = param("cosine", "R_t: cosine from R_0 to 0, or constant R_0")
    rule: Literal["paper", "momentum"] = param(
        "paper", "paper: U += eta (R - K), U >= 0; momentum (public code): s = m s + (1-m) s R/K, U = U_0 s")
    momentum: float = param(0.99, "m: running-average factor of the transition rate (and of s)", ge=0, lt=1)
    initial_lr: float = param(0.0, "U_0; 0 takes the quantized group's initial learning rate", ge=0)
    eta: float = param(0.0, "step of U in the paper rule; 0 takes U_0", ge=0)


@METHODS.register("talr")
class TALR(STE):
    """TALR (Lee et al., "Transition Rate Scheduling for Quantization-Aware Training", ICCV 2025,
    arXiv 2404.19248), on hard-quantized weights `p = hardquant(w)` as in STE.

    Per quantized tensor l, with `d_t` the integer level indices of `hardquant(w_t)` under levels
    estimated once from the weights `w_0` at the start of QAT and then frozen (so a moving scale
    causes no transition): transition rate `k_t = mean(d_t != d_{t-1})`, counted from the first
    update on (`d_0` are the indices of `w_0`); running rate `K_t = m K_{t-1} + (1-m) k_t`
    (`K_0 = R_0`); target `R_t`; step size `U_t = max(0, U_{t-1} + eta (R_t - K_t))` (paper rule,
    `eta = U_0` by default) or `s_t = m s_{t-1} + (1-m) s_{t-1} R_t / K_t`, `U_t = U_0 s_t`, `s_0 = 1`
    (public-code rule). Update t moves the latent weights by `w_t = w_{t-1} + U_{t-1} delta_t`, `delta_t`
    the base optimizer's own update at learning rate 1 (SGD: `-momentum_buffer`; AdamW:
    `-m/(sqrt(v)+eps) - wd w`), so `U` replaces the learning rate of quantized tensors only (the
    other groups keep the LR schedule), and `U_0` (the quantized group's initial LR) is used once.

    Which details follow what: the additive rule for `U`, `eta = U_0` and `R_0 = lambda sqrt(b)`
    (lambda 4e-3..6e-3; ternary b = log2 3) follow the paper; the momentum-multiplicative rule
    (`rule="momentum"`, with `K_0 = R_0`, `s_0 = 1`) follows the public code; a fixed initial rate
    instead of `lambda sqrt(b)` is `target_rate`. The target follows a cosine over the steps of QAT
    (updated every step; a per-epoch staircase of the same cosine differs by at most one epoch's
    decrement), or stays constant.

    The paper's setting (W/A, its modified LSQ): `--act-bits A --scale learned`. Activations are
    quantized as `round(clip(gamma x / s, 0, 2^A - 1)) / gamma`, `gamma = 2^A`, their steps trained
    (lr 0.01, no momentum, no weight decay; `s_A = 3 std(x) / sqrt(1 - 2/pi)` at the first training
    forward). The weights' steps start at `s_W = 3 std(W)` and stay frozen; the weights are quantized
    on the integer grid `k s_W / gamma`, `k = -2^(b-1) .. 2^(b-1) - 1` (`gamma = 2^(b-1)`), where the
    paper writes `round(clip(gamma w / s_W)) / gamma`: the same integers, the same transitions, an output
    larger by the constant `s_W`, which the BatchNorm after each quantized convolution of the paper's
    ResNets removes (the same function, and the same gradient on the latent weights). Transitions are
    counted on those integers. On a task without that normalization (the MLPs, LLaMA) the unscaled
    form would shrink every quantized input to [0, 1); there the activations take LSQ's form.
    """

    Config = TALRConfig
    freezes_weight_steps = True  # learned steps are set from the weights once (3 std) and frozen while TALR runs
    activation_form = "talr"  # the paper's modified LSQ for activations, steps trained
    default_scale_init = "3std"
    default_scale_lr = 0.01  # the paper's activation steps: lr 0.01, no momentum, no weight decay
    scale_momentum = 0.0

    def __init__(self, config: TALRConfig, optimizer, quantizer, total_steps, generator) -> None:
        super().__init__(config, optimizer, quantizer, total_steps, generator)
        self.qat_steps = max(1, total_steps - self.warmup_steps)
        group = next(g for g in optimizer.param_groups if g.get("quant"))
        self.initial_lr = config.initial_lr or group.get("initial_lr", group["lr"])
        self.eta = config.eta or self.initial_lr
        count, device = len(self.params), self.layout.device
        self.step_size = torch.full((count,), float(self.initial_lr), device=device)  # U_l
        bits = math.log2(3) if quantizer.bits == TERNARY else quantizer.bits
        self.initial_target = config.target_rate or config.rate_scale * math.sqrt(bits)  # R_0
        self.running_rate = torch.full((count,), self.initial_target, device=device)  # K_l
        self.scale = torch.ones(count, device=device)  # s_l (momentum rule)
        self.previous_indices: Tensor | None = None  # d_{t-1}, uint8, flat
        self.sizes = self.layout.tensor_sizes.to(self.layout.dtype)  # whole tensors (under FSDP: not the shards)
        self.target = self.initial_target  # R_t, the latest

    def target_rate(self, t: int) -> float:
        """R_t at QAT step t."""
        if self.config.target_schedule == "constant":
            return self.initial_target
        return self.initial_target * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t / self.qat_steps)))

    def _start_qat(self) -> None:
        """Estimate the levels from w_0 once and keep d_0, so that the first update's transitions count."""
        super()._start_qat()
        self.refresh_levels()
        self.previous_indices = self.level_indices()

    def refresh_due(self, t: int) -> bool:
        return False  # scales frozen while TALR runs

    def base_step(self) -> None:
        """Run the base optimizer at LR 1 on the quantized groups, then scale each tensor's update by U_l:
        `w <- w_old + U_l (w_lr1 - w_old)`, all tensors at once (the prox output buffer holds `w_old`
        meanwhile; prox overwrites it right after)."""
        quant_groups = [g for g in self.optimizer.param_groups if g.get("quant")]
        scheduled = [g["lr"] for g in quant_groups]
        old = self.output.copy_(self.latent_flat)
        for g in quant_groups:
            g["lr"] = 1.0
        self.optimizer.step()
        for g, lr in zip(quant_groups, scheduled):
            g["lr"] = lr
        self.latent_flat.sub_(old).mul_(self.layout.per_tensor_element(self.step_size)).add_(old)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> None:
        super().step(closure)
        t = self.steps - 1 - self.warmup_steps
        if t < 0:
            return
        indices = self.level_indices()
        changed = self.layout.tensor_reduce((indices != self.previous_indices).to(self.sizes.dtype))
        self.update(changed / self.sizes, self.target_rate(t))
        self.previous_indices = indices

    def update(self, rate: Tensor, target: float) -> None:
        """One update of K and U from the measured transition rates `rate` (one per tensor)."""
        m = self.config.momentum
        self.target = target
        self.running_rate.mul_(m).add_(rate, alpha=1 - m)
        if self.config.rule == "paper":
            self.step_size.add_(self.eta * (target - self.running_rate)).clamp_(min=0.0)
        else:
            ratio = target / self.running_rate.clamp(min=torch.finfo(self.running_rate.dtype).tiny)
            self.scale.mul_(m + (1 - m) * ratio)
            self.step_size.copy_(self.initial_lr * self.scale)

    def memory_tensors(self) -> list[Tensor]:
        return [*super().memory_tensors(), self.sizes]

    def diagnostics(self) -> dict[str, float]:
        return {"talr_step_size": self.step_size.mean().item(), "talr_running_rate": self.running_rate.mean().item(),
                "talr_target_rate": self.target}

    def state_dict(self):
        return {**super().state_dict(), "step_size": self.step_size, "running_rate": self.running_rate,
                "scale": self.scale, "previous_indices": self.previous_indices, "target": self.target}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.step_size, self.running_rate, self.scale = self._on_device(
            [state["step_size"], state["running_rate"], state["scale"]])
        previous = state["previous_indices"]
        self.previous_indices = None if previous is None else previous.to(self.device, copy=True)
        self.target = state["target"]


@METHODS.register("talr-baseline")
class TALRBaseline(TALR):
    """The plain optimizer with TALR's quantizers: the paper's SGD / Adam rows, beside which SGDT / AdamT (`talr`)
    are measured (Lee et al., ICCV 2025, arXiv 2404.19248).

    `p = hardquant(w)` as in STE, `w <- base_step(w, grad L(p))` at the recipe's learning rate; with `--scale
    learned` the weights' steps are trained (LSQ's gradient), not frozen, and with `--act-bits A` the activations
    take TALR's modified LSQ, as in `talr`. The transition rate is measured as in `talr` (its running average K
    is a diagnostic; no target steers anything).
    """

    freezes_weight_steps = False  # the baseline trains the weights' steps (the paper)

    def refresh_due(self, t: int) -> bool:
        return ProxMethod.refresh_due(self, t)  # levels re-estimated (or learned) as for STE, not frozen

    def base_step(self) -> None:
        self.optimizer.step()

    def diagnostics(self) -> dict[str, float]:
        return {"talr_running_rate": self.running_rate.mean().item()}
