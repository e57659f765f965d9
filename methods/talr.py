"""TALR: transition-rate scheduling of the latent updates of quantized weights."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import Tensor

from qatbench.method import Closure, ProxConfig
from qatbench.methods.ste import STE
from qatbench.params import param
from qatbench.quant import TERNARY, level_indices
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

    Per quantized tensor l, with `d_t` the integer level indices of `hardquant(w_t)` (levels
    estimated once when QAT starts and then frozen, so a moving scale causes no transition):
    transition rate `k_t = mean(d_t != d_{t-1})`, running rate `K_t = m K_{t-1} + (1-m) k_t`
    (`K_0 = R_0`), target `R_t` (cosine from `R_0 = lambda sqrt(b)` to 0 over QAT, or constant), and step size
    `U_t = max(0, U_{t-1} + eta (R_t - K_t))` (paper rule, `eta = U_0` by default) or
    `s_t = m s_{t-1} + (1-m) s_{t-1} R_t / K_t`, `U_t = U_0 s_t`, `s_0 = 1` (public-code rule).
    The latent update is `w <- w + U_{t-1} * delta`, `delta` the base optimizer's own update at
    learning rate 1 (SGD: `-momentum_buffer`; AdamW: `-m/(sqrt(v)+eps) - wd w`), so `U` replaces
    the learning rate of quantized tensors only; the other groups keep the LR schedule.
    """

    Config = TALRConfig

    def __init__(self, config: TALRConfig, optimizer, quantizer, total_steps, generator) -> None:
        super().__init__(config, optimizer, quantizer, total_steps, generator)
        self.qat_steps = max(1, total_steps - self.warmup_steps)
        group = next(g for g in optimizer.param_groups if g.get("quant"))
        self.initial_lr = config.initial_lr or group.get("initial_lr", group["lr"])
        self.eta = config.eta or self.initial_lr
        device = self.params[0].device if self.params else torch.device("cpu")
        count = len(self.params)
        self.step_size = torch.full((count,), float(self.initial_lr), device=device)  # U_l
        bits = math.log2(3) if quantizer.bits == TERNARY else quantizer.bits
        self.initial_target = config.target_rate or config.rate_scale * math.sqrt(bits)  # R_0
        self.running_rate = torch.full((count,), self.initial_target, device=device)  # K_l
        self.scale = torch.ones(count, device=device)  # s_l (momentum rule)
        self.previous_indices: list[Tensor] = []
        self.sizes = torch.tensor([p.numel() for p in self.params], dtype=torch.float32, device=device)
        self.target = self.initial_target

    def target_rate(self, t: int) -> float:
        """R_t at QAT step t."""
        if self.config.target_schedule == "constant":
            return self.initial_target
        return self.initial_target * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t / self.qat_steps)))

    def refresh_due(self, t: int) -> bool:
        return t == 0  # scales frozen while TALR runs

    def base_step(self) -> None:
        """Run the base optimizer at LR 1 on the quantized groups, then scale each tensor's update by U_l."""
        quant_groups = [g for g in self.optimizer.param_groups if g.get("quant")]
        scheduled = [g["lr"] for g in quant_groups]
        for g in quant_groups:
            g["lr"] = 1.0
        self.optimizer.step()
        for g, lr in zip(quant_groups, scheduled):
            g["lr"] = lr
        weights = [p.detach() for p in self.params]  # p = w + U_l (p_lr1 - w), all tensors at once
        torch._foreach_sub_(weights, self.latent)
        torch._foreach_mul_(weights, list(self.step_size.unbind()))
        torch._foreach_add_(weights, self.latent)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> None:
        super().step(closure)
        t = self.steps - 1 - self.warmup_steps
        if t < 0:
            return
        # level indices fit in uint8 (m <= 256): the previous step's cost a quarter of the weights' memory
        evenly_spaced = self.quantizer.evenly_spaced
        indices = [level_indices(w, q, b, evenly_spaced).to(torch.uint8)
                   for w, q, b in zip(self.latent_rows, self.levels, self.bounds)]
        if self.previous_indices:
            changed = torch.stack([(d != d_prev).sum() for d, d_prev in zip(indices, self.previous_indices)])
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
        self.previous_indices = self._on_device(state["previous_indices"])
        self.target = state["target"]
