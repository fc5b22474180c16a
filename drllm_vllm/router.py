"""The per-layer router and the maths of a routing decision.

A router reads the residual stream entering its layer, mean-pools it over W
equal windows of the prompt, runs a bottleneck MLP on each window mean and
averages the W logit vectors. The decision is the argmax, after the optional
post-hoc bias knob. Batched logits come from drllm_vllm.kernels (Triton on
CUDA, torch elsewhere); this module holds the decision rule and the module
that owns the weights.
"""

from __future__ import annotations

import functools
import math

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


@functools.lru_cache(maxsize=None)
def _allowed(may_skip: bool, may_repeat: bool, device: torch.device) -> torch.Tensor:
    """[3] bool: which of skip, execute, repeat a layer allows (built once)."""
    return torch.tensor([may_skip, True, may_repeat], device=device)


def decide(
    logits: torch.Tensor,
    bias: torch.Tensor | float,
    may_skip: bool = True,
    may_repeat: bool = True,
) -> torch.Tensor:
    """Actions [S] (0 skip, 1 execute, 2 repeat) for one layer's router logits
    [S, 3], with a bias p in [-1, 1] per row ([S] tensor) or for all rows.

    A class the layer does not allow (skip unless `may_skip`, repeat unless
    `may_repeat`) is never chosen, whatever the bias. The knob mixes the
    router's distribution over the allowed classes with a one-hot target:
    q = (1-|p|) softmax(allowed logits) + |p| onehot(target), argmax q, where
    the target is
    - p < 0: skip where the layer may skip; elsewhere there is none and the
      router decides (among execute and repeat);
    - p > 0: repeat where the layer may repeat, else execute (fewer skips).
    So a layer's action only moves towards the target as |p| grows: the
    layers applied (0, 1, 2) never rise as p falls below 0 nor fall as p
    rises above 0, and p = -1 (+1) takes the target at every layer that has
    one. p = 0 is the routers' own argmax over the allowed classes (the fast
    path). Ties go to the lower class, like torch.argmax.
    """
    allowed = _allowed(may_skip, may_repeat, logits.device)
    masked = logits.float().masked_fill(~allowed, -math.inf)
    p = torch.as_tensor(bias, dtype=torch.float32, device=logits.device)
    if not bool(p.any()):  # no knob (the usual case)
        return masked.argmax(dim=-1)
    p = p.expand(masked.shape[:-1]).unsqueeze(-1)
    target = torch.zeros_like(masked)
    target[..., REPEAT if may_repeat else EXECUTE] = (p[..., 0] > 0).float()
    if may_skip:
        target[..., SKIP] = (p[..., 0] < 0).float()
    mixed = (1 - p.abs()) * torch.softmax(masked, dim=-1) + p.abs() * target
    # no target (p = 0 in a mixed batch, or p < 0 where skip is not allowed):
    # the routers' own argmax, on the logits exactly as the fast path takes it
    q = torch.where(target.sum(-1, keepdim=True) > 0, mixed, masked)
    return q.masked_fill(~allowed, -math.inf).argmax(dim=-1)


__all__ = ["Router", "decide", "window_means", "num_windows_for", "EXECUTE"]
