"""The per-layer router and the maths of a routing decision.

A router reads the residual stream entering its layer, mean-pools it over W
equal windows of the prompt, runs a bottleneck MLP on each window mean and
averages the W logit vectors. The decision is the argmax, after the optional
post-hoc bias knob. Batched logits come from drllm_vllm.kernels (Triton on
CUDA, torch elsewhere); this module holds the decision rule and the module
that owns the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from .schedule import EXECUTE, REPEAT, SKIP

NUM_CLASSES = 3


class Router(nn.Module):
    """Linear(d->bottleneck) -> GELU(tanh) -> Linear(bottleneck->3)."""

    def __init__(self, hidden_size: int, bottleneck: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, bottleneck)
        self.fc2 = nn.Linear(bottleneck, NUM_CLASSES)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Xavier-uniform weights, zero biases (the paper's initialisation)."""
        for lin in (self.fc1, self.fc2):
            bound = (6.0 / (lin.in_features + lin.out_features)) ** 0.5
            with torch.no_grad():
                lin.weight.uniform_(-bound, bound, generator=generator)
                lin.bias.zero_()

    def forward(self, window_means: torch.Tensor) -> torch.Tensor:
        """[..., W, d] window means -> [..., 3] logits averaged over windows."""
        h = nn.functional.gelu(self.fc1(window_means), approximate="tanh")
        return self.fc2(h).mean(dim=-2)


def num_windows_for(num_tokens: int, num_windows: int) -> tuple[int, int]:
    """(windows, tokens per window): W clamped to T, leftover tokens dropped."""
    w = min(num_windows, num_tokens)
    return w, num_tokens // w


def window_means(x: torch.Tensor, num_windows: int) -> torch.Tensor:
    """[T, d] -> [W', d] fp32 means of W' equal contiguous windows."""
    w, n = num_windows_for(x.shape[0], num_windows)
    return x[: w * n].float().reshape(w, n, -1).mean(dim=1)


def route_window(num_prompt: int, route_tokens: int | None, route_start: int = 0) -> tuple[int, int]:
    """Prompt positions [start, end) the routers pool: the first `route_tokens`
    (all if None), from `route_start` on; both clamped to the prompt, at least
    its last token."""
    end = min(route_tokens or num_prompt, num_prompt)
    return min(route_start, end - 1), end


def decide(
    logits: torch.Tensor, bias: torch.Tensor | float, may_repeat: bool
) -> torch.Tensor:
    """Decisions for [S, 3] logits with per-row bias p in [-1, 1].

    The knob mixes the router's distribution with a one-hot one:
    q = (1-|p|) softmax(logits) + |p| onehot(skip if p < 0 else repeat).
    Repeat is excluded where the layer may not repeat (a positive bias then
    leaves the decision to the router). Ties go to the lower class, like
    torch.argmax.
    """
    p = torch.as_tensor(bias, dtype=torch.float32, device=logits.device)
    if not bool(p.any()):  # no knob (the usual case): the routers' own argmax
        return logits[..., : NUM_CLASSES if may_repeat else REPEAT].argmax(dim=-1)
    probs = torch.softmax(logits.float(), dim=-1)
    p = p.expand(probs.shape[:-1]).unsqueeze(-1)
    target = torch.zeros_like(probs)
    target[..., SKIP] = (p[..., 0] < 0).to(probs.dtype)
    if may_repeat:
        target[..., REPEAT] = (p[..., 0] > 0).to(probs.dtype)
    mixed = (1 - p.abs()) * probs + p.abs() * target
    # no target (p = 0, or repeat not allowed): the routers' own argmax
    q = torch.where(target.sum(-1, keepdim=True) > 0, mixed, logits.float())
    if not may_repeat:
        q = q[..., :REPEAT]
    return q.argmax(dim=-1)


__all__ = ["Router", "decide", "window_means", "num_windows_for", "EXECUTE"]
