"""Triton kernels (drllm_vllm.kernels) against their torch references.

On a machine without CUDA the kernels run in Triton's interpreter. Triton
decides between compiling and interpreting when a kernel is decorated, i.e.
when drllm_vllm.kernels is first imported, so TRITON_INTERPRET=1 is set here
before that import. If another test module imported the kernels earlier in
this process, the kernel tests are skipped here and
test_triton_kernels_in_fresh_process runs them in a child process instead.
"""

import os
import subprocess
import sys

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
# Triton's own @jit helpers (tl.sigmoid, ...) are decorated when triton is first
# imported; if that happened before TRITON_INTERPRET=1 (vLLM imports triton),
# interpreted kernels cannot call them in this process.
TRITON_IMPORTED_UNINTERPRETED = (
    "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
)
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import drllm_vllm.kernels as K  # noqa: E402
from drllm_vllm.kernels import router_pool  # noqa: E402

DEVICE = torch.device("cuda" if ON_CUDA else "cpu")


def _kernels_runnable() -> tuple[bool, str]:
    if not K.HAS_TRITON:
        return False, "triton is not importable"
    if ON_CUDA:
        return True, ""
    if TRITON_IMPORTED_UNINTERPRETED:
        return False, (
            "triton was imported (by vLLM) before TRITON_INTERPRET=1 was set; "
            "test_triton_kernels_in_fresh_process runs the kernel tests"
        )
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(router_pool._route_logits_kernel, InterpretedFunction):
        return True, ""
    return False, (
        "drllm_vllm.kernels was imported before TRITON_INTERPRET=1 was set, so its kernels "
        "are compiled for a GPU this machine lacks; test_triton_kernels_in_fresh_process runs them"
    )


RUNNABLE, NOT_RUNNABLE_WHY = _kernels_runnable()
# the interpreter evaluates sigmoid's exp(-x) in numpy, which warns when it saturates to inf
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
needs_triton = pytest.mark.skipif(not RUNNABLE, reason=NOT_RUNNABLE_WHY)


@pytest.mark.skipif(RUNNABLE or not K.HAS_TRITON, reason="the kernel tests run in this process")
def test_triton_kernels_in_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
           "-k", "triton and not fresh_process"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every torch.empty is filled with NaN (ints: -7), so unwritten outputs fail."""
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", poisoned_empty)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------
# router logits
# ---------------------------------------------------------------------------


def packed_sequences(lengths, d, dtype, gen, with_residual=True):
    """Sequences placed in random order with random gaps inside a larger buffer."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    starts = [0] * len(lengths)
    pos = int(torch.randint(0, 4, (1,), generator=gen))
    for i in order:
        starts[i] = pos
        pos += lengths[i] + int(torch.randint(0, 4, (1,), generator=gen))
    n = pos + 2
    hidden = torch.randn(n, d, generator=gen).to(DEVICE, dtype)
    residual = (3 * torch.randn(n, d, generator=gen)).to(DEVICE, dtype) if with_residual else None
    return hidden, residual, torch.tensor(starts, device=DEVICE), torch.tensor(lengths, device=DEVICE)


def router_weights(d, gen, hidden_units=128):
    w1 = torch.randn(hidden_units, d, generator=gen) / d**0.5
    b1 = 0.1 * torch.randn(hidden_units, generator=gen)
    w2 = torch.randn(3, hidden_units, generator=gen) / hidden_units**0.5
    b2 = 0.1 * torch.randn(3, generator=gen)
    return [t.to(DEVICE) for t in (w1, b1, w2, b2)]


def assert_matches_reference(out, ref, dtype):
    logits, decisions = out
    ref_logits, ref_decisions = ref
    tol = 1e-3 if dtype == torch.float32 else 1e-2
    assert logits.shape == ref_logits.shape and logits.dtype == torch.float32
    assert decisions.shape == ref_decisions.shape and decisions.dtype == torch.int64
    assert torch.isfinite(logits).all(), logits
    assert rel_err(logits, ref_logits) < tol, (logits, ref_logits)
    top2 = ref_logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > tol * ref_logits.abs().max()
    assert torch.equal(decisions[clear], ref_decisions[clear]), (decisions, ref_decisions)


CASES = {  # name: (lengths, num_windows, d)
    "T<W": ([3], 8, 100),
    "T=1": ([1], 8, 576),
    "T not a multiple of W": ([21], 8, 100),
    "many sequences": ([1, 5, 8, 17, 40, 3, 9], 8, 576),
    "one window": ([9, 4], 1, 100),
    "W=5": ([13, 2, 30], 5, 100),
    "W above 16": ([45, 7], 20, 64),
}
PATHS = {  # how the Triton kernel cuts the work: None = its own choice
    "auto": None,
    "chunks, many splits": dict(num_chunks=3, block_t=16, cols_per_split=32),
    "one split": dict(cols_per_split=1 << 16),
}


@needs_triton
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["hidden", "hidden+residual"])
@pytest.mark.parametrize("case", CASES)
def test_triton_route_logits_matches_reference(case, with_residual, dtype, path, poisoned_outputs):
    lengths, num_windows, d = CASES[case]
    gen = torch.Generator().manual_seed(hash((case, with_residual, str(dtype), path)) % 2**31)
    hidden, residual, starts, lens = packed_sequences(lengths, d, dtype, gen, with_residual)
    weights = router_weights(d, gen)
    config = None
    if PATHS[path] is not None:
        config = router_pool.choose_config(
            len(lengths), max(lengths), d, num_windows, hidden.element_size(), DEVICE, **PATHS[path])
    out = K.route_logits_triton(hidden, starts, lens, num_windows, *weights, residual, config=config)
    ref = K.route_logits_ref(hidden, starts, lens, num_windows, *weights, residual)
    assert_matches_reference(out, ref, dtype)


@needs_triton
@pytest.mark.skipif(not ON_CUDA, reason="long inputs are too slow for the interpreter")
@pytest.mark.parametrize("lengths,d", [([32768], 4096), ([4093] * 7 + [130, 1], 896), ([512] * 64, 576)])
def test_triton_route_logits_long_inputs_on_gpu(lengths, d, poisoned_outputs):
    gen = torch.Generator().manual_seed(len(lengths))
    hidden, residual, starts, lens = packed_sequences(lengths, d, torch.bfloat16, gen)
    weights = router_weights(d, gen)
    out = K.route_logits_triton(hidden, starts, lens, 8, *weights, residual)
    ref = K.route_logits_ref(hidden, starts, lens, 8, *weights, residual)
    assert_matches_reference(out, ref, torch.bfloat16)


@needs_triton
def test_triton_route_logits_is_deterministic_and_leaves_its_counters_zero():
    gen = torch.Generator().manual_seed(1)
    hidden, residual, starts, lens = packed_sequences([50, 7], 100, torch.float32, gen)
    weights = router_weights(100, gen)
    config = router_pool.choose_config(2, 50, 100, 8, 4, DEVICE, num_chunks=2, cols_per_split=32)
    first = K.route_logits_triton(hidden, starts, lens, 8, *weights, residual, config=config)
    again = K.route_logits_triton(hidden, starts, lens, 8, *weights, residual, config=config)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not router_pool._arrival_counters(DEVICE, 1).any()


def _hand_computed_example():
    """(hidden, starts, lengths, weights, expected logits) of two sequences, W=2.

    Sequence 0: T=5, W=2 -> windows {rows 0,1} and {rows 2,3}; row 4 dropped.
    Means [1, 0] and [0, 1]; w1 = I, b1 = 0 -> h = [g, 0] and [0, g] with
    g = gelu_tanh(1). w2 rows (1,0), (0,1), (-1,-1), b2 = (0, .5, 0):
    window logits (g, .5, -g) and (0, g+.5, -g) -> mean (g/2, g/2+.5, -g).
    Sequence 1: T=1 (one window, the row itself): row [-2, 0] -> h = [gelu(-2), 0]."""
    g = 0.8411919906082768
    g_minus2 = -0.04540230591222
    hidden = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [9.0, 9.0], [-2.0, 0.0]])
    weights = (torch.eye(2), torch.zeros(2),
               torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]), torch.tensor([0.0, 0.5, 0.0]))
    expected = torch.tensor([[g / 2, g / 2 + 0.5, -g], [g_minus2, 0.5, -g_minus2]])
    return hidden, torch.tensor([0, 5]), torch.tensor([5, 1]), weights, expected


def test_reference_matches_hand_computed_example():
    hidden, starts, lens, weights, expected = _hand_computed_example()
    logits, decisions = K.route_logits_ref(hidden, starts, lens, 2, *weights)
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    assert decisions.tolist() == [1, 1]


def test_reference_with_one_layout_per_step_matches_the_hand_computed_example():
    # The example above, its windows laid out once (as the model does once per
    # step) and reused: known answer first, then a second "layer" (other
    # hidden states, same sequences) against the answer without the layout.
    hidden, starts, lens, weights, expected = _hand_computed_example()
    layout = K.pooling_layout(starts, lens, 2)
    assert (layout.lo, layout.hi, layout.windows.tolist()) == (0, 6, [2, 1])
    assert layout.rows.tolist() == [0, 1, 2, 3, 5] and layout.offsets.tolist() == [0, 2, 4]
    logits, _ = K.route_logits_ref(hidden, starts, lens, 2, *weights, layout=layout)
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    other = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    residual = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    for a, b in zip(K.route_logits_ref(other, starts, lens, 2, *weights, residual, layout),
                    K.route_logits_ref(other, starts, lens, 2, *weights, residual)):
        assert torch.equal(a, b)
    # every sequence with all its windows: the uniform path, rows offset by lo
    layout = K.pooling_layout(torch.tensor([2, 4]), torch.tensor([2, 2]), 2)
    assert (layout.lo, layout.before) == (2, None) and layout.rows.tolist() == [0, 1, 2, 3]


def test_reference_adds_residual_and_breaks_ties_low():
    hidden = torch.tensor([[1.0, -1.0]])
    residual = torch.tensor([[-1.0, 1.0]])  # the sum is zero: all logits equal b2
    w1, b1, w2 = torch.ones(2, 2), torch.zeros(2), torch.ones(3, 2)
    b2 = torch.tensor([0.0, 0.3, 0.3])
    logits, decisions = K.route_logits_ref(
        hidden, torch.tensor([0]), torch.tensor([1]), 8, w1, b1, w2, b2, residual)
    torch.testing.assert_close(logits, b2[None], rtol=0, atol=1e-7)
    assert decisions.tolist() == [1]


# ---------------------------------------------------------------------------
# row dispatch
# ---------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_rows,d", [(0, 100), (1, 576), (37, 100), (300, 576)])
def test_triton_gather_rows_matches_index_select(num_rows, d, dtype, poisoned_outputs):
    gen = torch.Generator().manual_seed(num_rows + d)
    x = torch.randn(2 * num_rows + 5, d, generator=gen).to(DEVICE, dtype)
    rows = torch.randint(0, len(x), (num_rows,), generator=gen).to(DEVICE)  # repeats allowed
    out = K.gather_rows_triton(x, rows)
    assert out.is_contiguous()
    assert torch.equal(out, K.gather_rows_ref(x, rows))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_rows,d", [(0, 100), (1, 576), (37, 100), (300, 576)])
def test_triton_scatter_rows_matches_index_copy(num_rows, d, dtype):
    gen = torch.Generator().manual_seed(num_rows * d + 1)
    dst = torch.randn(2 * num_rows + 5, d, generator=gen).to(DEVICE, dtype)
    rows = torch.randperm(len(dst), generator=gen)[:num_rows].to(DEVICE)
    src = torch.randn(num_rows, d, generator=gen).to(DEVICE, dtype)
    expected = K.scatter_rows_ref_(dst.clone(), rows, src)
    result = K.scatter_rows_triton_(dst, rows, src)
    assert result is dst
    assert torch.equal(dst, expected)


def test_reference_dispatch_round_trip():
    x = torch.arange(12.0).view(6, 2)
    rows = torch.tensor([4, 1])
    packed = K.gather_rows_ref(x, rows)
    assert packed.tolist() == [[8.0, 9.0], [2.0, 3.0]]
    K.scatter_rows_ref_(x, rows, -packed)
    assert x[[4, 1]].tolist() == [[-8.0, -9.0], [-2.0, -3.0]]
    assert x[0].tolist() == [0.0, 1.0]


# ---------------------------------------------------------------------------
# choosing the implementation
# ---------------------------------------------------------------------------


def _spy(monkeypatch, name):
    calls = []
    real = getattr(K, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(K, name, spy)
    return calls


def _tiny_route_inputs():
    gen = torch.Generator().manual_seed(0)
    hidden, residual, starts, lens = packed_sequences([5, 2], 32, torch.float32, gen)
    return (hidden, starts, lens, 4, *router_weights(32, gen), residual)


def test_torch_setting_forces_the_reference(monkeypatch):
    monkeypatch.setenv("DRLLM_KERNELS", "torch")
    ref_calls = _spy(monkeypatch, "route_logits_ref")
    triton_calls = _spy(monkeypatch, "route_logits_triton")
    K.route_logits(*_tiny_route_inputs())
    assert (ref_calls, triton_calls) == (["route_logits_ref"], [])


def test_auto_uses_triton_exactly_on_cuda(monkeypatch):
    monkeypatch.delenv("DRLLM_KERNELS", raising=False)
    ref_calls = _spy(monkeypatch, "route_logits_ref")
    triton_calls = _spy(monkeypatch, "route_logits_triton")
    K.route_logits(*_tiny_route_inputs())
    uses_triton = ON_CUDA and K.HAS_TRITON
    assert (len(triton_calls), len(ref_calls)) == ((1, 0) if uses_triton else (0, 1))


@needs_triton
def test_triton_setting_forces_triton(monkeypatch):
    monkeypatch.setenv("DRLLM_KERNELS", "triton")
    triton_calls = _spy(monkeypatch, "route_logits_triton")
    gather_calls = _spy(monkeypatch, "gather_rows_triton")
    inputs = _tiny_route_inputs()
    out = K.route_logits(*inputs)
    assert triton_calls == ["route_logits_triton"]
    assert_matches_reference(out, K.route_logits_ref(*inputs), torch.float32)
    K.gather_rows(inputs[0], torch.tensor([2, 0], device=DEVICE))
    assert gather_calls == ["gather_rows_triton"]


def test_bad_setting_is_named(monkeypatch):
    monkeypatch.setenv("DRLLM_KERNELS", "cuda")
    with pytest.raises(ValueError, match="DRLLM_KERNELS='cuda'.*auto, torch, triton"):
        K.route_logits(*_tiny_route_inputs())
