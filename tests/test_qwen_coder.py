"""The second built-in model, Qwen2.5-Coder-0.5B-Instruct, end to end (fp32, CPU).

Not part of CI (two 0.5B engines and the oracle take minutes on 2 cores):
`make test-qwen-coder` prepares the model and runs this file with
DRLLM_TEST_QWEN_CODER=1; without it the module is skipped. Both engines run
eagerly: what is checked here is the model, not compilation
(tests/test_compiled.py covers that on the default model).
"""

from __future__ import annotations

import os

import pytest

from drllm_vllm.schedule import EXECUTE, REPEAT, SKIP

from .conftest import PROMPTS, make_llm, schedule_of_changes, shutdown
from .test_engine import MAX_TOKENS, forced, params, run

pytestmark = pytest.mark.skipif(
    os.environ.get("DRLLM_TEST_QWEN_CODER") != "1",
    reason="Qwen2.5-Coder-0.5B tests run with DRLLM_TEST_QWEN_CODER=1 (make test-qwen-coder)")

MODEL = "qwen2.5-coder-0.5b-instruct"
L = 24


def sched(**changes: int) -> tuple[int, ...]:
    return schedule_of_changes(L, **changes)


# skip / execute / repeat mixes, one per prompt: first and last layer, runs of
# skips, repeats beside skips, a third of the layers skipped
FORCED = [
    sched(),
    sched(l0=SKIP, l23=SKIP),
    sched(l0=REPEAT, l23=REPEAT),
    sched(l3=REPEAT, l4=SKIP, l12=REPEAT, l13=SKIP, l20=SKIP),
    sched(l9=SKIP, l10=SKIP, l11=SKIP),
    tuple(SKIP if i % 3 == 2 else EXECUTE for i in range(L)),
    sched(l1=REPEAT, l8=REPEAT, l15=REPEAT, l22=REPEAT),
    tuple((SKIP, EXECUTE, REPEAT)[i % 3] if 4 <= i < 20 else EXECUTE for i in range(L)),
]
PROMPTS8 = PROMPTS[:8]


@pytest.fixture(scope="module")
def coder_checkpoint():
    """Every layer may skip and repeat (untrained routers): forced repeats anywhere."""
    from drllm_vllm.checkpoint import prepare

    return prepare(MODEL, allow="all")


@pytest.fixture(scope="module")
def coder_ids(coder_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(coder_checkpoint)
    return [tok.encode(p) for p in PROMPTS8]


@pytest.fixture(scope="module")
def plain_tokens(coder_ids):
    """Plain vLLM's greedy tokens on the base checkpoint; its engine is shut
    down before the Dr.LLM one starts (two fp32 0.5B engines at once crowd a
    small machine)."""
    from drllm_vllm.checkpoint import cache_dir

    plain = make_llm(cache_dir() / "base" / MODEL, enforce_eager=True,
                     enable_prefix_caching=False)
    try:
        return [t for t, _ in run(plain, coder_ids, params())]
    finally:
        shutdown(plain)


@pytest.fixture(scope="module")
def coder_llm(coder_checkpoint):
    llm = make_llm(coder_checkpoint, enforce_eager=True)
    yield llm
    shutdown(llm)


def test_full_mode_gives_plain_vllm_tokens(plain_tokens, coder_llm, coder_ids):
    ours = run(coder_llm, coder_ids, params(drllm_mode="full"))
    assert all(s == (EXECUTE,) * L for _, s in ours)
    assert [t for t, _ in ours] == plain_tokens


def test_forced_mixed_schedules_alone_and_batched_match_oracle(coder_llm, coder_checkpoint,
                                                              coder_ids):
    from drllm_vllm.pipeline.reference import Reference

    pairs = list(zip(coder_ids, FORCED))
    alone = [run(coder_llm, [p], forced(s))[0] for p, s in pairs]
    together = run(coder_llm, coder_ids, [forced(s) for s in FORCED])
    oracle = Reference(coder_checkpoint)
    for (p, s), a, t in zip(pairs, alone, together):
        ref_tokens, _ = oracle.generate(p, MAX_TOKENS, schedule=s)
        assert a[1] == t[1] == s
        assert a[0] == ref_tokens, f"alone differs from the oracle for {s}"
        assert t[0] == ref_tokens, f"batched differs from the oracle for {s}"
