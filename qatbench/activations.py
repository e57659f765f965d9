"""Activation quantization: the input of every quantized layer, per tensor, on a learned step.

`ActivationQuantizer` quantizes a layer's input `x` to A bits, in one of two forms:

* LSQ (Esser et al., ICLR 2020): `x_q = round(clip(x / s, -Q_N, Q_P)) * s`; unsigned inputs (after a
  ReLU) `Q_N = 0, Q_P = 2^A - 1`, signed ones `Q_N = 2^(A-1), Q_P = 2^(A-1) - 1`. Gradients: the
  straight-through estimator inside the clip range, zero outside (`dx = dx_q` where
  `-Q_N <= x/s <= Q_P`), and `ds = dx_q * (round(x/s) - x/s)` inside, `-Q_N` or `Q_P` outside, times
  LSQ's gradient scale `g = 1 / sqrt(N Q_P)` (N: the features of one sample). Step at the first
  training forward: `s = 2 mean|x| / sqrt(Q_P)`.
* TALR's modified LSQ (Lee et al., ICCV 2025): `x_q = round(clip(gamma x / s, alpha, beta)) / gamma`,
  unsigned `(alpha, beta, gamma) = (0, 2^A - 1, 2^A)` (signed: `(-2^(A-1), 2^(A-1) - 1, 2^(A-1))`),
  no post-scaling by s (the BatchNorm after every quantized convolution absorbs it); the same
  straight-through gradients, the same gradient scale; step `s = 3 std(x) / sqrt(1 - 2/pi)`.

`round` is the shared quantizer's (`qatbench.quant`): a value halfway between two integers goes down.
The first training forward sets the step from the batch (the mean of every rank's statistic on
several ranks); after that it is a parameter like any other, in the scales' own parameter group
(no weight decay). A quantizer that is off (`enabled = False`, rtn during training) passes its
input through; `calibrate` sets every step from a few batches and turns them on (rtn's W+A
post-training quantization).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .distributed import reduce_tensor_

Form = Literal["lsq", "talr"]
QUANTIZER_NAME = "input_quantizer"  # the submodule each quantized layer holds; its step is `<layer>.input_quantizer.step`


def round_down_ties(u: Tensor) -> Tensor:
    """The nearest integer, a value halfway between two going down (the shared quantizer's tie rule)."""
    return (u - 0.5).ceil()


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """`(lowest, highest)` integer of a grid of `bits`: `(-2^(b-1), 2^(b-1) - 1)` signed, `(0, 2^b - 1)` not."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


class _Quantize(torch.autograd.Function):
    """LSQ's `round(clip(x / s, low, high)) * s`, or TALR's `round(clip(gamma x / s, low, high)) / gamma` (`gamma`
    not None), with LSQ's gradients written out (a handful of elementwise kernels each way, where autograd through
    the same formula would launch twice as many): `dx = g_out` strictly inside `(low, high)`, 0 at and beyond its
    ends; LSQ `ds = grad_scale * sum g_out (round(u) - u)` inside, `low` or `high` at and beyond; TALR (`x_q = x/s`
    to the straight-through estimator) `dx = g_out / s`, `ds = -grad_scale * sum g_out x / s^2` inside."""

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, low: int, high: int, gamma: float | None,  # type: ignore[override]
                grad_scale: float) -> Tensor:
        u = x / step if gamma is None else x * (gamma / step)
        q = (u - 0.5).ceil_().clamp_(low, high)
        ctx.save_for_backward(u, q, step)
        ctx.low, ctx.high, ctx.gamma, ctx.grad_scale = low, high, gamma, grad_scale
        return q * step if gamma is None else q.div(gamma)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        u, q, step = ctx.saved_tensors
        inside = (u > ctx.low).logical_and_(u < ctx.high)
        masked = grad * inside
        if ctx.gamma is None:
            slope = q.sub(u * inside)  # round(u) - u inside, the clipped end outside
            step_grad = (grad * slope).sum() * ctx.grad_scale
            return masked, step_grad.reshape(step.shape), None, None, None, None
        step_grad = -(masked * u).sum() * (ctx.grad_scale / (ctx.gamma * step))
        return masked.div_(step), step_grad.reshape(step.shape), None, None, None, None


def lsq(x: Tensor, step: Tensor, low: int, high: int, gradient_scale: float) -> Tensor:
    """`round(clip(x / s, low, high)) * s` with LSQ's gradients (see the module's docstring)."""
    return _Quantize.apply(x, step, low, high, None, gradient_scale)


def talr(x: Tensor, step: Tensor, low: int, high: int, gamma: float, gradient_scale: float) -> Tensor:
    """TALR's `round(clip(gamma x / s, low, high)) / gamma`, with the straight-through gradients."""
    return _Quantize.apply(x, step, low, high, gamma, gradient_scale)


class ActivationQuantizer(nn.Module):
    """The quantizer of one layer's input: A bits, signed or not, in LSQ's or TALR's form, on a learned step."""

    def __init__(self, bits: int, signed: bool, form: Form = "lsq", init: str = "lsq") -> None:
        super().__init__()
        self.bits, self.signed, self.form, self.init = bits, signed, form, init
        self.low, self.high = integer_range(bits, signed)
        self.gamma = float(2 ** (bits - 1) if signed else 2**bits)
        self.step = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.ready = False  # `initialized`, on the host: the forward never reads the device
        self.enabled = True

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.ready = bool(self.initialized)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, form={self.form}, init={self.init}"

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """The step from a batch `x`: LSQ's `2 mean|x| / sqrt(Q_P)`, or TALR's `3 std(x) / sqrt(1 - 2/pi)` (`init`),
        which in LSQ's form is the step of TALR's grid, divided by gamma. The moments are sums over every rank's
        part of the batch (float64), so several ranks set the step one process sets."""
        x = x.detach().double()
        moments = reduce_tensor_(torch.stack([x.abs().sum(), x.sum(), x.square().sum(),
                                              x.new_tensor(float(x.numel()))]))
        absolute, total, square, count = moments
        if self.init == "lsq":
            statistic = 2 * (absolute / count) / math.sqrt(self.high)
        else:
            std = ((square - total * total / count) / (count - 1)).clamp(min=0).sqrt()
            statistic = 3 * std / math.sqrt(1 - 2 / math.pi) / (self.gamma if self.form == "lsq" else 1.0)
        self.step.copy_(statistic.clamp(min=torch.finfo(self.step.dtype).tiny))
        self.initialized.fill_(True)
        self.ready = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if self.training and not self.ready:
            self.initialize(x)
        scale = 1.0 / math.sqrt(x.numel() // max(1, x.shape[0]) * self.high)  # N: the features of a sample
        step = self.step.to(x.dtype)
        if self.form == "lsq":
            return lsq(x, step, self.low, self.high, scale)
        return talr(x, step, self.low, self.high, self.gamma, scale)


def _quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (getattr(module, QUANTIZER_NAME)(args[0]), *args[1:])


def attach(layers: Iterable[tuple[nn.Module, bool]], bits: int, form: Form, init: str) -> list[ActivationQuantizer]:
    """Give each `(layer, signed)` an input quantizer (a submodule, so its step is in the state dict) and a forward
    pre-hook that applies it; the quantizers."""
    quantizers = []
    for layer, signed in layers:
        quantizer = ActivationQuantizer(bits, signed, form, init).to(next(layer.parameters()).device)
        layer.add_module(QUANTIZER_NAME, quantizer)
        layer.register_forward_pre_hook(_quantize_input)
        quantizers.append(quantizer)
    return quantizers


def quantizers_of(model: nn.Module) -> list[ActivationQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActivationQuantizer)]


def is_step(name: str) -> bool:
    """Whether a parameter name is an activation quantizer's step."""
    return name.endswith(f"{QUANTIZER_NAME}.step")


@torch.no_grad()
def calibrate(model: nn.Module, forward: Callable[[Tensor], Any], batches: Iterable[tuple[Tensor, Tensor]],
              count: int = 4) -> None:
    """Post-training quantization of the activations: each step is the mean of its initial step on each of `count`
    batches (the model in evaluation mode; each batch's forward quantizes with the steps it just set); then every
    quantizer is on."""
    quantizers = quantizers_of(model)
    was_training = model.training
    model.eval()
    sums, seen = [torch.zeros_like(q.step) for q in quantizers], 0
    for inputs, _ in batches:
        for quantizer in quantizers:
            quantizer.enabled, quantizer.ready, quantizer.training = True, False, True  # set from this batch
        forward(inputs)
        for total, quantizer in zip(sums, quantizers):
            total += quantizer.step
        seen += 1
        if seen == count:
            break
    for total, quantizer in zip(sums, quantizers):
        quantizer.step.copy_(total / max(1, seen))
    model.train(was_training)
