"""Kernels of drllm_vllm: router logits (fused pooling + MLP) and row dispatch.

This is the one place where an implementation is chosen. Tensors on CUDA go
to Triton when it is importable; everything else goes to the torch
references. DRLLM_KERNELS=torch|triton|auto (read at each call) forces a
choice; `triton` on CPU tensors needs TRITON_INTERPRET=1 set before these
kernels were imported.
"""

import os

import torch

from .dispatch import (
    TRITON_GATHER_WINS,
    TRITON_SCATTER_WINS,
    gather_rows_ref,
    gather_rows_triton,
    scatter_rows_ref_,
    scatter_rows_triton_,
)
from .router_pool import (
    HAS_TRITON, LaunchConfig, PoolingLayout, pooling_layout, route_logits_ref, route_logits_triton,
)

_CHOICES = ("auto", "torch", "triton")


def kernel_choice() -> str:
    """The DRLLM_KERNELS setting: 'auto' (default), 'torch' or 'triton'."""
    choice = os.environ.get("DRLLM_KERNELS", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"DRLLM_KERNELS={choice!r}: expected one of {', '.join(_CHOICES)}")
    if choice == "triton" and not HAS_TRITON:
        raise RuntimeError("DRLLM_KERNELS=triton but triton is not importable")
    return choice


def _use_triton(x: torch.Tensor, triton_wins: bool = True) -> bool:
    """auto: Triton for CUDA tensors where it measured faster; else as forced."""
    choice = kernel_choice()
    if choice == "auto":
        return HAS_TRITON and x.is_cuda and triton_wins
    return choice == "triton"


def route_logits(
    hidden: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    num_windows: int,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    residual: torch.Tensor | None = None,
    *,
    max_length: int | None = None,
    layout: PoolingLayout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [S, 3] fp32 and argmax decisions [S] int64 for packed
    sequences (see router_pool). max_length, when the caller knows it,
    saves the Triton path a device->host read; layout (`pooling_layout` of
    the same sequences), the torch path its per-call window arithmetic."""
    if _use_triton(hidden):
        return route_logits_triton(
            hidden, starts, lengths, num_windows, w1, b1, w2, b2, residual, max_length=max_length
        )
    return route_logits_ref(hidden, starts, lengths, num_windows, w1, b1, w2, b2, residual, layout)


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[rows] as a new contiguous [R, d] tensor."""
    if _use_triton(x, TRITON_GATHER_WINS):
        return gather_rows_triton(x, rows)
    return gather_rows_ref(x, rows)


def scatter_rows_(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst[rows] = src in place (rows unique); returns dst."""
    if _use_triton(dst, TRITON_SCATTER_WINS):
        return scatter_rows_triton_(dst, rows, src)
    return scatter_rows_ref_(dst, rows, src)


__all__ = [
    "HAS_TRITON",
    "LaunchConfig",
    "gather_rows",
    "gather_rows_ref",
    "gather_rows_triton",
    "kernel_choice",
    "route_logits",
    "PoolingLayout",
    "pooling_layout",
    "route_logits_ref",
    "route_logits_triton",
    "scatter_rows_",
    "scatter_rows_ref_",
    "scatter_rows_triton_",
]
