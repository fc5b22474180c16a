"""Row dispatch: gather the rows a layer runs on, scatter its output back.

A routed layer runs only on the rows whose sequences execute (or repeat) it.
`gather_rows` packs those rows of a [N, d] tensor into a contiguous [R, d]
one; `scatter_rows_` writes [R, d] results back in place. Both are pure
bandwidth (2*R*d*elem bytes). Rows must be unique for the scatter, as for
index_copy_.
"""

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the torch reference still works
    from . import _no_triton as triton

    tl = triton.language
    HAS_TRITON = False


# ---------------------------------------------------------------------------
# torch reference
# ---------------------------------------------------------------------------


def gather_rows_ref(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[rows] as a new contiguous tensor."""
    return x.index_select(0, rows)


def scatter_rows_ref_(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst[rows] = src, in place; returns dst."""
    return dst.index_copy_(0, rows, src)


# ---------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------


@triton.jit
def _copy_rows_kernel(
    src, dst, rows, num_rows, d, stride_src, stride_dst,
    GATHER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """GATHER: dst[i] = src[rows[i]]; else dst[rows[i]] = src[i].

    Program (row block, column block); one index load serves BLOCK_D columns.
    """
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_mask = offs_r < num_rows
    mask = r_mask[:, None] & (offs_d < d)[None, :]
    index = tl.load(rows + offs_r, mask=r_mask, other=0).to(tl.int64)
    packed = offs_r.to(tl.int64)
    if GATHER:
        x = tl.load(src + index[:, None] * stride_src + offs_d[None, :], mask=mask)
        tl.store(dst + packed[:, None] * stride_dst + offs_d[None, :], x, mask=mask)
    else:
        x = tl.load(src + packed[:, None] * stride_src + offs_d[None, :], mask=mask)
        tl.store(dst + index[:, None] * stride_dst + offs_d[None, :], x, mask=mask)


def _launch_copy(src, dst, rows, num_rows, gather: bool) -> None:
    d = src.shape[1]
    block_d = min(triton.next_power_of_2(d), 4096 // src.element_size())  # up to 4 KiB of a row
    block_r = max(1, 4096 // block_d)
    grid = (triton.cdiv(num_rows, block_r), triton.cdiv(d, block_d))
    _copy_rows_kernel[grid](
        src, dst, rows, num_rows, d, src.stride(0), dst.stride(0),
        GATHER=gather, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )


def gather_rows_triton(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """gather_rows_ref in Triton."""
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(len(rows), x.shape[1], device=x.device, dtype=x.dtype)
    if len(rows):
        _launch_copy(x, out, rows, len(rows), gather=True)
    return out


def scatter_rows_triton_(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """scatter_rows_ref_ in Triton."""
    if dst.stride(1) != 1:
        raise ValueError("scatter_rows_triton_ writes in place: dst's rows must be contiguous")
    if src.shape != (len(rows), dst.shape[1]) or src.dtype != dst.dtype:
        raise ValueError(f"src {tuple(src.shape)} {src.dtype}: expected {(len(rows), dst.shape[1])} {dst.dtype}")
    if src.stride(1) != 1:
        src = src.contiguous()
    if len(rows):
        _launch_copy(src, dst, rows, len(rows), gather=False)
    return dst


# Which implementation the public functions use on CUDA, from
# benchmarks/kernels.py on an H100 (benchmarks/results/kernels_nvidia_h100_80gb_hbm3.md,
# bf16, median ms, torch / Triton). Gather: index_select is as fast as Triton
# (R=32768, d=4096: 0.194 / 0.191; R=4096, d=576: 0.0097 / 0.0108), so torch
# stays. Scatter: index_copy_ moves twice the time (R=32768, d=4096:
# 0.417 / 0.192; R=4096, d=576: 0.0140 / 0.0082), so Triton.
TRITON_GATHER_WINS = False
TRITON_SCATTER_WINS = True
