"""Dr.LLM router logits: windowed mean pooling fused with the router MLP.

For one sequence of T rows x [T, d] (the residual stream entering a layer):
Wc = min(W, T) windows of n = T // Wc contiguous rows each (the last T mod Wc
rows are dropped), window means m [Wc, d] in fp32, per-window logits
gelu_tanh(m @ w1.T + b1) @ w2.T + b2, averaged over the windows -> [3];
the decision is their argmax (0 skip, 1 execute, 2 repeat).

The work is almost all in reading x: 2*d bytes per row (4*d with a residual)
against about 3*128*d flops per *window*. So the Triton path is a streaming
reduction that reads every element once and spreads long sequences over the
whole GPU, followed by tiny stages for the MLP:

  1. `_window_sums_kernel` (long inputs only): one program per
     (sequence, window, chunk of rows, block of columns) writes an fp32
     partial sum. Chunks are sized so the grid fills every SM even for a
     single 32k-token prompt.
  2. `_window_project_kernel`: one program per (sequence, column split) sums
     the partials of its columns (or, for short inputs, pools the rows
     itself, saving a launch) and multiplies by its slice of w1, giving a
     partial pre-activation [windows, 128].
  3. `_router_head_kernel` (only when the columns were split): adds the
     splits, then bias, GELU, the 128->3 layer, the mean over windows and
     the argmax. With one split, stage 2 does this itself.

Every reduction has a fixed order, so results are bitwise reproducible.
"""

import dataclasses
import functools

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


def window_rows(
    starts: torch.Tensor, lengths: torch.Tensor, num_windows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows that are pooled and the (sequence * W + window) slot of each.

    Returns (rows [M], slots [M], windows [S], rows_per_window [S]); M is the
    number of rows kept, T mod Wc rows per sequence being dropped.
    """
    lengths = lengths.to(torch.int64)
    windows = lengths.clamp(max=num_windows)
    per_window = lengths // windows
    kept = windows * per_window
    seq = torch.repeat_interleave(torch.arange(len(kept), device=kept.device), kept)
    first = torch.cumsum(kept, 0) - kept
    pos = torch.arange(seq.numel(), device=kept.device) - first[seq]
    rows = starts.to(torch.int64)[seq] + pos
    slots = seq * num_windows + pos // per_window[seq]
    return rows, slots, windows, per_window


def route_logits_ref(
    hidden: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    num_windows: int,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [S, 3] (fp32) and decisions [S] (int64), in plain torch.

    hidden (and residual, added in fp32 when given) are packed rows [N, d];
    sequence s is rows starts[s] : starts[s] + lengths[s] (lengths >= 1).
    """
    device = hidden.device
    starts, lengths = starts.to(device), lengths.to(device)
    num_seqs, d = len(lengths), hidden.shape[1]
    rows, slots, windows, per_window = window_rows(starts, lengths, num_windows)
    x = hidden.index_select(0, rows).float()
    if residual is not None:
        x = x + residual.index_select(0, rows).float()
    sums = torch.zeros(num_seqs * num_windows, d, device=device, dtype=torch.float32)
    sums.index_add_(0, slots, x)
    means = sums.view(num_seqs, num_windows, d) / per_window.view(-1, 1, 1)
    h = torch.nn.functional.gelu(means @ w1.float().T + b1.float(), approximate="tanh")
    per_window_logits = h @ w2.float().T + b2.float()  # [S, W, 3]
    valid = torch.arange(num_windows, device=device) < windows.view(-1, 1)
    logits = (per_window_logits * valid.unsqueeze(-1)).sum(1) / windows.view(-1, 1)
    return logits, logits.argmax(dim=-1)


# ---------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------


@triton.jit
def _gelu_tanh(x):
    # 0.5 x (1 + tanh(u)) == x * sigmoid(2u): no tanh intrinsic needed, and
    # it saturates cleanly for large |u|.
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x * tl.sigmoid(2.0 * u)


@triton.jit
def _router_head(
    z, s, num_windows_here, b1, w2, b2, logits, decisions, stride_w2,
    WIN_PAD: tl.constexpr, HIDDEN: tl.constexpr,
):
    """z [WIN_PAD, HIDDEN] = window means @ w1.T -> logits[s], decisions[s]."""
    win = tl.arange(0, WIN_PAD)
    hid = tl.arange(0, HIDDEN)
    h = _gelu_tanh(z + tl.load(b1 + hid).to(tl.float32)[None, :])
    valid = win < num_windows_here
    # 128 -> 3 as three row reductions: far too small for tl.dot.
    l0 = tl.sum(tl.where(valid, tl.sum(h * tl.load(w2 + hid).to(tl.float32)[None, :], 1), 0.0), 0)
    l1 = tl.sum(tl.where(valid, tl.sum(h * tl.load(w2 + stride_w2 + hid).to(tl.float32)[None, :], 1), 0.0), 0)
    l2 = tl.sum(tl.where(valid, tl.sum(h * tl.load(w2 + 2 * stride_w2 + hid).to(tl.float32)[None, :], 1), 0.0), 0)
    l0 = l0 / num_windows_here + tl.load(b2).to(tl.float32)
    l1 = l1 / num_windows_here + tl.load(b2 + 1).to(tl.float32)
    l2 = l2 / num_windows_here + tl.load(b2 + 2).to(tl.float32)
    tl.store(logits + s * 3, l0)
    tl.store(logits + s * 3 + 1, l1)
    tl.store(logits + s * 3 + 2, l2)
    # argmax with ties to the lower class, like torch.argmax
    best = tl.maximum(l0, l1)
    decision = tl.where(l1 > l0, 1, 0)
    decision = tl.where(l2 > best, 2, decision)
    tl.store(decisions + s, decision.to(tl.int64))


@triton.jit
def _window_sums_kernel(
    hidden, residual, starts, lengths, partial,
    stride_h, stride_r, d, num_windows, num_chunks, chunk_rows,
    HAS_RESIDUAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """partial[(s*W + w)*num_chunks + c, :] = sum of chunk c of window w of s.

    Program (pid, pid_d): one chunk of one window, BLOCK_D columns. The
    [BLOCK_T, BLOCK_D] accumulator is reduced over rows once, at the end.
    """
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    chunk = pid % num_chunks
    window = (pid // num_chunks) % num_windows
    s = pid // (num_chunks * num_windows)
    length = tl.load(lengths + s)
    windows_here = tl.minimum(length, num_windows)
    if window < windows_here:  # programs past a short sequence's windows idle
        per_window = length // windows_here
        first_row = tl.load(starts + s).to(tl.int64) + window * per_window
        lo = chunk * chunk_rows
        hi = tl.minimum(lo + chunk_rows, per_window)
        offs_t = tl.arange(0, BLOCK_T)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = offs_d < d
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for t in range(lo, hi, BLOCK_T):
            rows = first_row + t + offs_t
            mask = ((t + offs_t) < hi)[:, None] & d_mask[None, :]
            x = tl.load(hidden + rows[:, None] * stride_h + offs_d[None, :], mask=mask,
                        other=0.0, eviction_policy="evict_first").to(tl.float32)
            if HAS_RESIDUAL:
                x += tl.load(residual + rows[:, None] * stride_r + offs_d[None, :], mask=mask,
                             other=0.0, eviction_policy="evict_first").to(tl.float32)
            acc += x
        tl.store(partial + pid.to(tl.int64) * d + offs_d, tl.sum(acc, axis=0), mask=d_mask)


@triton.jit
def _window_project_kernel(
    hidden, residual, partial, starts, lengths, w1, b1, w2, b2, preact, logits, decisions,
    stride_h, stride_r, stride_w1, stride_w2, d, num_windows, num_chunks, cols_per_split,
    POOL_INLINE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, APPLY_HEAD: tl.constexpr,
    WIN_PAD: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Window means of columns [split] times w1[:, split] -> [WIN_PAD, HIDDEN].

    Program (s, split). The means come from stage 1's partials, or, with
    POOL_INLINE, straight from the rows (short inputs: one launch fewer).
    """
    s = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    length = tl.load(lengths + s)
    windows_here = tl.minimum(length, num_windows)
    per_window = length // windows_here
    win = tl.arange(0, WIN_PAD)
    hid = tl.arange(0, HIDDEN)
    offs_t = tl.arange(0, BLOCK_T)
    z = tl.zeros([WIN_PAD, HIDDEN], dtype=tl.float32)
    col_lo = split * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, d)
    for d0 in range(col_lo, col_hi, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < col_hi
        m = tl.zeros([WIN_PAD, BLOCK_D], dtype=tl.float32)
        if POOL_INLINE:
            first_row = tl.load(starts + s).to(tl.int64)
            for w in range(0, windows_here):
                acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
                for t in range(0, per_window, BLOCK_T):
                    rows = first_row + w * per_window + t + offs_t
                    mask = ((t + offs_t) < per_window)[:, None] & d_mask[None, :]
                    x = tl.load(hidden + rows[:, None] * stride_h + offs_d[None, :], mask=mask,
                                other=0.0, eviction_policy="evict_first").to(tl.float32)
                    if HAS_RESIDUAL:
                        x += tl.load(residual + rows[:, None] * stride_r + offs_d[None, :], mask=mask,
                                     other=0.0, eviction_policy="evict_first").to(tl.float32)
                    acc += x
                m = tl.where((win == w)[:, None], tl.sum(acc, axis=0)[None, :], m)
        else:
            slot = (s * num_windows + win).to(tl.int64) * num_chunks
            mask = (win < windows_here)[:, None] & d_mask[None, :]
            for c in range(0, num_chunks):
                m += tl.load(partial + (slot + c)[:, None] * d + offs_d[None, :], mask=mask, other=0.0)
        m = m / per_window.to(tl.float32)
        w1_t = tl.load(w1 + hid[None, :] * stride_w1 + offs_d[:, None], mask=d_mask[:, None],
                       other=0.0).to(tl.float32)  # [BLOCK_D, HIDDEN]
        z += tl.dot(m, w1_t, input_precision="ieee")
    if APPLY_HEAD:
        _router_head(z, s, windows_here, b1, w2, b2, logits, decisions, stride_w2, WIN_PAD, HIDDEN)
    else:
        out = preact + (s * num_splits + split).to(tl.int64) * (WIN_PAD * HIDDEN)
        tl.store(out + win[:, None] * HIDDEN + hid[None, :], z)


@triton.jit
def _router_head_kernel(
    preact, lengths, b1, w2, b2, logits, decisions, stride_w2, num_windows, num_splits,
    WIN_PAD: tl.constexpr, HIDDEN: tl.constexpr,
):
    """Adds the column splits of stage 2 and applies the head, one program per sequence."""
    s = tl.program_id(0)
    windows_here = tl.minimum(tl.load(lengths + s), num_windows)
    offs = tl.arange(0, WIN_PAD)[:, None] * HIDDEN + tl.arange(0, HIDDEN)[None, :]
    z = tl.zeros([WIN_PAD, HIDDEN], dtype=tl.float32)
    for i in range(0, num_splits):
        z += tl.load(preact + (s * num_splits + i).to(tl.int64) * (WIN_PAD * HIDDEN) + offs)
    _router_head(z, s, windows_here, b1, w2, b2, logits, decisions, stride_w2, WIN_PAD, HIDDEN)


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How route_logits_triton cuts the work; `choose_config` picks one."""

    pool_inline: bool  # pool in stage 2 (no stage 1)
    num_chunks: int  # row chunks per window in stage 1
    chunk_rows: int
    num_splits: int  # column splits in stage 2
    cols_per_split: int
    block_t: int = 32
    block_d_pool: int = 128
    block_d_proj: int = 32
    num_warps_pool: int = 4


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: keep grids small


# Inputs of at most this many bytes per (sequence, column split) program are
# pooled inline by stage 2 (two launches, or one); larger ones go through
# stage 1. Measured on an H100, see benchmarks/results/kernels_*.md.
INLINE_MAX_BYTES = 256 * 1024
# Stage 1 aims for this many programs per SM: enough rows in flight to
# saturate HBM without making the partial-sum buffer large.
POOL_PROGRAMS_PER_SM = 8


def choose_config(
    num_seqs: int, max_length: int, d: int, num_windows: int, elem_size: int, has_residual: bool,
    device: torch.device, **overrides,
) -> LaunchConfig:
    """A launch configuration for these sizes (keyword overrides for tuning)."""
    sms = _num_sms(device)
    block_t = overrides.get("block_t", 32)
    block_d_pool = overrides.get("block_d_pool", 256 // elem_size)  # 256 bytes of each row
    row_bytes = d * elem_size * (2 if has_residual else 1)
    block_d_proj = overrides.get("block_d_proj", 32)
    per_window = max_length // min(num_windows, max_length)
    windows = min(num_windows, max_length)
    # column splits for stage 2: enough programs for the GPU when S is small
    max_splits = triton.cdiv(d, block_d_proj)
    num_splits = overrides.get("num_splits", max(1, min(max_splits, (2 * sms) // num_seqs)))
    cols_per_split = triton.cdiv(triton.cdiv(d, num_splits), block_d_proj) * block_d_proj
    num_splits = triton.cdiv(d, cols_per_split)
    inline_bytes = windows * per_window * row_bytes * cols_per_split // d
    pool_inline = overrides.get("pool_inline", inline_bytes <= overrides.get("inline_max_bytes", INLINE_MAX_BYTES))
    # row chunks for stage 1: fill the GPU, but no chunk shorter than block_t
    d_blocks = triton.cdiv(d, block_d_pool)
    target = overrides.get("programs_per_sm", POOL_PROGRAMS_PER_SM) * sms
    max_chunks = triton.cdiv(per_window, block_t)
    num_chunks = max(1, min(max_chunks, triton.cdiv(target, num_seqs * windows * d_blocks)))
    chunk_rows = triton.cdiv(triton.cdiv(per_window, num_chunks), block_t) * block_t
    num_chunks = overrides.get("num_chunks", triton.cdiv(per_window, chunk_rows))
    chunk_rows = triton.cdiv(per_window, num_chunks)
    return LaunchConfig(
        pool_inline=pool_inline, num_chunks=num_chunks, chunk_rows=chunk_rows,
        num_splits=num_splits, cols_per_split=cols_per_split, block_t=block_t,
        block_d_pool=block_d_pool, block_d_proj=block_d_proj,
        num_warps_pool=overrides.get("num_warps_pool", 4),
    )


def route_logits_triton(
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
    config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """route_logits_ref in Triton. Pass max_length (the longest sequence) to
    skip the one device->host read needed to size the grid."""
    if not HAS_TRITON:
        raise RuntimeError("route_logits_triton needs Triton; use route_logits_ref")
    device = hidden.device
    num_seqs, (_, d) = len(lengths), hidden.shape
    hidden_units = w1.shape[0]
    if hidden_units < 16 or hidden_units & (hidden_units - 1):
        raise ValueError(f"router bottleneck {hidden_units}: the kernel needs a power of two >= 16")
    if num_windows < 1:
        raise ValueError(f"num_windows={num_windows}: must be >= 1")
    logits = torch.empty(num_seqs, 3, device=device, dtype=torch.float32)
    decisions = torch.empty(num_seqs, device=device, dtype=torch.int64)
    if num_seqs == 0:
        return logits, decisions
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    w1, b1, w2, b2 = w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous()
    starts, lengths = starts.to(device), lengths.to(device)
    if max_length is None:
        max_length = int(lengths.max())
    has_residual = residual is not None
    cfg = config or choose_config(
        num_seqs, max_length, d, num_windows, hidden.element_size(), has_residual, device
    )
    res = residual if has_residual else hidden
    win_pad = max(16, triton.next_power_of_2(num_windows))

    partial = hidden  # unused when pooling inline
    if not cfg.pool_inline:
        partial = torch.empty(num_seqs * num_windows * cfg.num_chunks, d, device=device, dtype=torch.float32)
        grid = (num_seqs * num_windows * cfg.num_chunks, triton.cdiv(d, cfg.block_d_pool))
        _window_sums_kernel[grid](
            hidden, res, starts, lengths, partial,
            hidden.stride(0), res.stride(0), d, num_windows, cfg.num_chunks, cfg.chunk_rows,
            HAS_RESIDUAL=has_residual, BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d_pool,
            num_warps=cfg.num_warps_pool,
        )
    apply_head = cfg.num_splits == 1
    preact = logits
    if not apply_head:
        preact = torch.empty(num_seqs, cfg.num_splits, win_pad, hidden_units, device=device, dtype=torch.float32)
    _window_project_kernel[(num_seqs, cfg.num_splits)](
        hidden, res, partial, starts, lengths, w1, b1, w2, b2, preact, logits, decisions,
        hidden.stride(0), res.stride(0), w1.stride(0), w2.stride(0), d, num_windows,
        cfg.num_chunks, cfg.cols_per_split,
        POOL_INLINE=cfg.pool_inline, HAS_RESIDUAL=has_residual, APPLY_HEAD=apply_head,
        WIN_PAD=win_pad, HIDDEN=hidden_units, BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d_proj,
        num_warps=4,
    )
    if not apply_head:
        _router_head_kernel[(num_seqs,)](
            preact, lengths, b1, w2, b2, logits, decisions, w2.stride(0), num_windows, cfg.num_splits,
            WIN_PAD=win_pad, HIDDEN=hidden_units, num_warps=4,
        )
    return logits, decisions
