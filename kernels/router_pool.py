"""Dr.LLM router logits: windowed mean pooling fused with the router MLP.

For one sequence of T rows x [T, d] (the residual stream entering a layer):
Wc = min(W, T) windows of n = T // Wc contiguous rows each (the last T mod Wc
rows are dropped), window means m [Wc, d] in fp32, per-window logits
gelu_tanh(m @ w1.T + b1) @ w2.T + b2, averaged over the windows -> [3];
the decision is their argmax (0 skip, 1 execute, 2 repeat).

The work is almost all in reading x: 2*d bytes per row (4*d with a residual)
against about 3*128*d flops per *window*. So the Triton kernel is a streaming
reduction that reads every element once and spreads even a single 32k-token
prompt over the whole GPU; the MLP rides on its tail, in the same launch
(one launch matters: a router runs per layer, and its host cost adds up):

  * every program sums one chunk of rows of one window over BLOCK_D columns
    and writes an fp32 partial sum;
  * the last program to finish a (sequence, column split) -- counted with an
    atomic -- adds that split's partials and multiplies by its slice of w1,
    giving a partial pre-activation [windows, 128];
  * the last split of a sequence to finish adds the splits and applies bias,
    GELU, the 128->3 layer, the mean over windows and the argmax.

Sums run in a fixed order, so results are bitwise reproducible. The arrival
counters live in a per-device buffer that the last arrivers reset to zero,
so concurrent calls on different streams of one device are not supported.
"""

import dataclasses
import functools

import numpy as np
import torch
import torch.nn.functional as F

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


def window_layout(
    starts: torch.Tensor, lengths: torch.Tensor, num_windows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the windows of packed sequences lie (host arrays).

    Sequence s is rows starts[s] : starts[s] + lengths[s] (lengths >= 1); it
    has Wc = min(W, T) windows of T // Wc rows. Returns (rows [K] int64: the
    kept rows of every window in order, window offsets [sum of Wc] int64: where
    each window begins in `rows`, windows [S] int64: Wc per sequence).
    """
    st = starts.cpu().numpy().astype(np.int64)
    ln = lengths.cpu().numpy().astype(np.int64)
    windows = np.minimum(num_windows, ln)
    per_window = ln // windows
    kept = windows * per_window  # the last T mod Wc rows are dropped
    kept_before = np.cumsum(kept) - kept
    rows = np.repeat(st - kept_before, kept) + np.arange(int(kept.sum()), dtype=np.int64)
    windows_before = np.cumsum(windows) - windows
    j = np.arange(int(windows.sum()), dtype=np.int64) - np.repeat(windows_before, windows)
    offsets = np.repeat(kept_before, windows) + j * np.repeat(per_window, windows)
    return rows, offsets, windows


@dataclasses.dataclass(frozen=True)
class PoolingLayout:
    """`window_layout` as tensors for `route_logits_ref`. A step's routed
    sequences are the same at every layer, so the model builds this once per
    step instead of once per layer (each op costs tens of microseconds here)."""

    lo: int  # rows lo:hi of the packed batch hold every pooled row
    hi: int
    rows: torch.Tensor  # [K] int64: the kept rows of every window, minus lo
    offsets: torch.Tensor  # [sum of Wc] int64: where each window begins in rows
    windows: np.ndarray  # [S] int64: Wc per sequence
    before: torch.Tensor | None  # [S] first window of each sequence; None if all Wc equal


def pooling_layout(
    starts: torch.Tensor, lengths: torch.Tensor, num_windows: int, device="cpu"
) -> PoolingLayout:
    """The PoolingLayout of packed sequences (see window_layout); S >= 1."""
    rows, offsets, windows = window_layout(starts, lengths, num_windows)
    lo, hi = int(rows.min()), int(rows.max()) + 1  # convert only the span pooled
    uniform = bool((windows == windows[0]).all())  # usual: every prompt has >= W tokens
    return PoolingLayout(
        lo, hi, torch.from_numpy(rows - lo).to(device), torch.from_numpy(offsets).to(device),
        windows, None if uniform else torch.from_numpy(np.cumsum(windows) - windows).to(device),
    )


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
    layout: PoolingLayout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [S, 3] (fp32) and decisions [S] (int64), in plain torch.

    hidden (and residual, added in fp32 when given) are packed rows [N, d];
    sequence s is rows starts[s] : starts[s] + lengths[s] (lengths >= 1).
    Every window of every sequence is pooled by one `embedding_bag` (mean
    over the window's rows) and the MLP runs once on all windows. This is
    also the CPU path, where each op costs tens of microseconds to start
    (OpenMP wake-ups), whatever its size, so the op count must not grow
    with the number of sequences. starts and lengths are read on the host,
    unless `layout` (`pooling_layout` of the same starts, lengths and
    num_windows) is given.
    """
    if starts.numel() == 0:
        empty = hidden.new_zeros(0, 3, dtype=torch.float32)
        return empty, empty.argmax(dim=-1)
    if layout is None:
        layout = pooling_layout(starts, lengths, num_windows, hidden.device)
    x = hidden[layout.lo:layout.hi].to(torch.float32, copy=True)
    if residual is not None:
        x.add_(residual[layout.lo:layout.hi])  # in fp32
    means = F.embedding_bag(layout.rows, x, layout.offsets, mode="mean")
    h = F.gelu(F.linear(means, w1.float(), b1.float()), approximate="tanh")
    per_window = F.linear(h, w2.float(), b2.float())  # [sum of windows, 3]
    if layout.before is None:
        logits = per_window.view(len(layout.windows), int(layout.windows[0]), 3).mean(dim=1)
    else:
        index = torch.arange(per_window.shape[0], device=hidden.device)
        logits = F.embedding_bag(index, per_window, layout.before, mode="mean")
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
def _route_logits_kernel(
    hidden, residual, starts, lengths, partial, preact, counters,
    w1, b1, w2, b2, logits, decisions,
    stride_h, stride_r, stride_w1, stride_w2, d, num_windows, num_chunks, chunk_rows,
    blocks_per_split, num_splits,
    HAS_RESIDUAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DP: tl.constexpr, WIN_PAD: tl.constexpr, HIDDEN: tl.constexpr,
):
    """Program (s * W * num_chunks + w * num_chunks + c, column block)."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    chunk = pid % num_chunks
    window = (pid // num_chunks) % num_windows
    s = pid // (num_chunks * num_windows)
    length = tl.load(lengths + s).to(tl.int32)
    windows_here = tl.minimum(length, num_windows)
    per_window = length // windows_here

    # 1. partial sum of this chunk's rows (programs past a short sequence's windows idle)
    if window < windows_here:
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

    # 2. the last program of this (sequence, column split) projects the split
    split = pid_d // blocks_per_split
    d_blocks = tl.cdiv(d, BLOCK_D)
    blocks_here = tl.minimum(blocks_per_split, d_blocks - split * blocks_per_split)
    tl.debug_barrier()  # the whole program's partial is stored before it is counted
    arrived = tl.atomic_add(counters + s * num_splits + split, 1, sem="acq_rel")
    if arrived == num_windows * num_chunks * blocks_here - 1:
        tl.store(counters + s * num_splits + split, 0)  # ready for the next call
        win = tl.arange(0, WIN_PAD)
        hid = tl.arange(0, HIDDEN)
        slot = (s * num_windows + win).to(tl.int64) * num_chunks
        win_mask = win < windows_here
        z = tl.zeros([WIN_PAD, HIDDEN], dtype=tl.float32)
        col_lo = split * blocks_per_split * BLOCK_D
        col_hi = tl.minimum(col_lo + blocks_per_split * BLOCK_D, d)
        for d0 in range(col_lo, col_hi, BLOCK_DP):
            offs_p = d0 + tl.arange(0, BLOCK_DP)
            p_mask = offs_p < col_hi
            m = tl.zeros([WIN_PAD, BLOCK_DP], dtype=tl.float32)
            for c in range(0, num_chunks):
                m += tl.load(partial + (slot + c)[:, None] * d + offs_p[None, :],
                             mask=win_mask[:, None] & p_mask[None, :], other=0.0, cache_modifier=".cg")
            m = m / per_window.to(tl.float32)
            w1_t = tl.load(w1 + hid[None, :] * stride_w1 + offs_p[:, None], mask=p_mask[:, None],
                           other=0.0).to(tl.float32)  # [BLOCK_DP, HIDDEN]
            z += tl.dot(m, w1_t, input_precision="ieee")
        if num_splits == 1:
            _router_head(z, s, windows_here, b1, w2, b2, logits, decisions, stride_w2, WIN_PAD, HIDDEN)
        else:
            # 3. the last split of the sequence adds the splits and applies the head
            tile = win[:, None] * HIDDEN + hid[None, :]
            tile_mask = win_mask[:, None]  # only the windows this sequence has
            tl.store(preact + (s * num_splits + split).to(tl.int64) * (WIN_PAD * HIDDEN) + tile, z,
                     mask=tile_mask)
            num_seqs = tl.num_programs(0) // (num_windows * num_chunks)
            seq_counter = counters + num_seqs * num_splits + s  # after the split counters
            tl.debug_barrier()
            if tl.atomic_add(seq_counter, 1, sem="acq_rel") == num_splits - 1:
                tl.store(seq_counter, 0)
                z = tl.zeros([WIN_PAD, HIDDEN], dtype=tl.float32)
                for i in range(0, num_splits):
                    z += tl.load(preact + (s * num_splits + i).to(tl.int64) * (WIN_PAD * HIDDEN) + tile,
                                 mask=tile_mask, other=0.0, cache_modifier=".cg")
                _router_head(z, s, windows_here, b1, w2, b2, logits, decisions, stride_w2, WIN_PAD, HIDDEN)


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How route_logits_triton cuts the work; `choose_config` picks one."""

    num_chunks: int  # row chunks per window
    chunk_rows: int
    blocks_per_split: int  # column blocks per column split of the projection
    num_splits: int
    block_t: int = 64
    block_d: int = 128
    block_dp: int = 32
    num_warps: int = 4


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: keep grids small


# Defaults measured on an H100 (benchmarks/kernels.py --tune; see
# benchmarks/results/kernels_*.md): aim for this many programs per SM, so
# that enough rows are in flight to saturate HBM without making the
# partial-sum buffer large; and project at most this many columns per split.
POOL_PROGRAMS_PER_SM = 8
COLS_PER_SPLIT = 128  # 128: 224 us at S=1, T=32k, d=4096; 512: 263 us; one split: 642 us


def choose_config(
    num_seqs: int, max_length: int, d: int, num_windows: int, elem_size: int,
    device: torch.device, **overrides,
) -> LaunchConfig:
    """A launch configuration for these sizes (keyword overrides for tuning)."""
    if not overrides:
        return _default_config(num_seqs, max_length, d, num_windows, elem_size, device)
    return _make_config(num_seqs, max_length, d, num_windows, elem_size, device, **overrides)


def _make_config(num_seqs, max_length, d, num_windows, elem_size, device, **overrides) -> LaunchConfig:
    per_window = max_length // min(num_windows, max_length)
    windows = min(num_windows, max_length)
    block_t = overrides.get("block_t", 64)
    # 256 (else 128) bytes of each row per program, whichever divides the row
    block_d = overrides.get("block_d", 256 // elem_size if d % (256 // elem_size) == 0 else 128 // elem_size)
    d_blocks = triton.cdiv(d, block_d)
    blocks_per_split = max(1, overrides.get("cols_per_split", COLS_PER_SPLIT) // block_d)
    num_splits = triton.cdiv(d_blocks, blocks_per_split)
    # row chunks: fill the GPU, but no chunk shorter than block_t
    target = overrides.get("programs_per_sm", POOL_PROGRAMS_PER_SM) * _num_sms(device)
    max_chunks = triton.cdiv(per_window, block_t)
    num_chunks = max(1, min(max_chunks, triton.cdiv(target, num_seqs * windows * d_blocks)))
    num_chunks = overrides.get("num_chunks", num_chunks)
    chunk_rows = triton.cdiv(per_window, num_chunks)
    return LaunchConfig(
        num_chunks=num_chunks, chunk_rows=chunk_rows, blocks_per_split=blocks_per_split,
        num_splits=num_splits, block_t=block_t, block_d=block_d,
        block_dp=overrides.get("block_dp", 32), num_warps=overrides.get("num_warps", 4),
    )


_default_config = functools.lru_cache(maxsize=256)(_make_config)  # saves host time per call

_counters: dict[torch.device, torch.Tensor] = {}


def _arrival_counters(device: torch.device, size: int) -> torch.Tensor:
    """Zeroed int32 counters, kept per device; every launch leaves them zero."""
    buf = _counters.get(device)
    if buf is None or buf.numel() < size:
        buf = _counters[device] = torch.zeros(max(size, 1024), device=device, dtype=torch.int32)
    return buf


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
    """route_logits_ref in one Triton launch. Pass max_length (the longest
    sequence) to skip the one device->host read needed to size the grid."""
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
    starts, lengths = starts.to(device), lengths.to(device)  # int32 or int64
    if max_length is None:
        max_length = int(lengths.max())
    cfg = config or choose_config(num_seqs, max_length, d, num_windows, hidden.element_size(), device)
    win_pad = max(16, triton.next_power_of_2(num_windows))
    partial = torch.empty(num_seqs * num_windows * cfg.num_chunks, d, device=device, dtype=torch.float32)
    preact = logits  # unused with one split
    if cfg.num_splits > 1:
        preact = torch.empty(num_seqs * cfg.num_splits, win_pad, hidden_units, device=device, dtype=torch.float32)
    counters = _arrival_counters(device, num_seqs * (cfg.num_splits + 1))
    res = hidden if residual is None else residual
    grid = (num_seqs * num_windows * cfg.num_chunks, triton.cdiv(d, cfg.block_d))
    _route_logits_kernel[grid](
        hidden, res, starts, lengths, partial, preact, counters, w1, b1, w2, b2, logits, decisions,
        hidden.stride(0), res.stride(0), w1.stride(0), w2.stride(0), d, num_windows,
        cfg.num_chunks, cfg.chunk_rows, cfg.blocks_per_split, cfg.num_splits,
        HAS_RESIDUAL=residual is not None, BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d,
        BLOCK_DP=cfg.block_dp, WIN_PAD=win_pad, HIDDEN=hidden_units, num_warps=cfg.num_warps,
    )
    return logits, decisions
