"""The vLLM path against the oracle, on the real default model (fp32, CPU).

Every assertion compares the engine with something it does not compute
itself: plain vLLM on the base checkpoint, or the no-KV-cache reference.
"""

from __future__ import annotations

import pytest
from vllm import SamplingParams

from drllm_vllm import schedule_of
from drllm_vllm.schedule import EXECUTE, REPEAT, SKIP

from .conftest import PROMPTS, make_llm, schedule_of_changes, shutdown

L = 30
MAX_TOKENS = 6


def sched(**changes: int) -> tuple[int, ...]:
    return schedule_of_changes(L, **changes)


FORCED = [
    sched(),  # all execute
    sched(l0=SKIP),  # first layer skipped
    sched(l29=SKIP),  # last layer skipped
    sched(l0=SKIP, l29=SKIP, l5=REPEAT),
    sched(l3=REPEAT, l10=REPEAT, l20=REPEAT),
    sched(l12=SKIP, l13=SKIP, l14=SKIP),
    sched(l0=REPEAT, l29=REPEAT, l7=SKIP, l21=SKIP),
    tuple(SKIP if i % 3 == 2 else EXECUTE for i in range(L)),
    sched(l1=REPEAT, l2=SKIP, l15=REPEAT, l16=SKIP, l28=SKIP),
]


def ids_of(tokenizer, prompt: str) -> list[int]:
    return tokenizer.encode(prompt)


def params(**extra) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args=extra or None)


def run(llm, prompt_ids, sampling):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], sampling, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), schedule_of(o)) for o in outs]


def forced(s):
    return params(drllm_mode="schedule", drllm_schedule=list(s))


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [ids_of(tokenizer, p) for p in PROMPTS]


def test_full_mode_equals_plain_vllm(dr_llm, prompt_ids, checkpoint):
    from drllm_vllm.checkpoint import cache_dir

    ours = run(dr_llm, prompt_ids, params(drllm_mode="full"))
    assert all(s == (EXECUTE,) * L for _, s in ours)
    base = cache_dir() / "base" / "smollm2-135m-instruct"
    plain = make_llm(base, enforce_eager=True, enable_prefix_caching=False)
    try:
        theirs = run(plain, prompt_ids, params())
    finally:
        shutdown(plain)
    assert [t for t, _ in ours] == [t for t, _ in theirs]


def test_forced_schedules_alone_batched_and_oracle_agree(dr_llm, oracle, prompt_ids):
    pairs = list(zip(prompt_ids, FORCED))
    alone = [run(dr_llm, [p], forced(s))[0] for p, s in pairs]
    together = run(dr_llm, [p for p, _ in pairs], [forced(s) for _, s in pairs])
    for (p, s), a, t in zip(pairs, alone, together):
        ref_tokens, _ = oracle.generate(p, MAX_TOKENS, schedule=s)
        assert a[1] == t[1] == s
        assert a[0] == ref_tokens, f"alone differs from oracle for {s}"
        assert t[0] == ref_tokens, f"batched differs from oracle for {s}"


def test_both_row_subset_paths_agree_with_oracle(dr_llm, oracle, prompt_ids):
    # In decode (one token per row), layer 3 is skipped by 7 rows and layer 4 by
    # 5: more than RESTORE_MAX_TOKENS, so they run on gathered subsets with
    # their own attention metadata. Layer 9 is skipped by 2 rows and repeated by
    # 1: every row runs it and the skipping rows' states are put back.
    from drllm_vllm.batch import RESTORE_MAX_TOKENS

    assert 2 <= RESTORE_MAX_TOKENS < 5
    a, b = sched(l3=SKIP, l4=SKIP), sched(l3=SKIP, l9=SKIP)
    c, d = sched(l9=REPEAT), sched()
    plan = [a, a, a, a, a, b, b, c, d]
    got = run(dr_llm, prompt_ids, [forced(s) for s in plan])
    for p, s, (tokens, schedule) in zip(prompt_ids, plan, got):
        ref_tokens, _ = oracle.generate(p, MAX_TOKENS, schedule=s)
        assert schedule == s
        assert tokens == ref_tokens, f"batched differs from oracle for {s}"


@pytest.mark.parametrize("bias", [0.0, -0.4, 0.4])
def test_routed_schedules_match_oracle_alone_and_mixed(dr_llm, oracle, prompt_ids, bias):
    routed = params(drllm_bias=bias) if bias else params()
    alone = [run(dr_llm, [p], routed)[0] for p in prompt_ids[:4]]
    # mixed with forced-schedule and full-mode requests of other lengths
    mixed_prompts = prompt_ids[:4] + prompt_ids[4:7]
    mixed_params = [routed] * 4 + [forced(FORCED[3]), params(drllm_mode="full"), forced(FORCED[7])]
    mixed = run(dr_llm, mixed_prompts, mixed_params)
    for p, a, m in zip(prompt_ids, alone, mixed):
        ref_tokens, ref_schedule = oracle.generate(p, MAX_TOKENS, bias=bias)
        assert a[1] == ref_schedule and m[1] == ref_schedule
        assert a[0] == ref_tokens and m[0] == ref_tokens
    assert mixed[4][1] == FORCED[3] and mixed[6][1] == FORCED[7]


def test_route_tokens_equals_routing_the_question_alone(dr_llm, oracle, tokenizer):
    question = ids_of(tokenizer, "Question: Which gas do plants take in from the air? Answer:")
    choice = ids_of(tokenizer, " carbon dioxide")
    (_, on_question), = run(dr_llm, [question], params())
    (_, with_choice), = run(
        dr_llm, [question + choice], params(drllm_route_tokens=len(question))
    )
    _, ref = oracle.forward(question + choice, route_tokens=len(question))
    assert with_choice == on_question == ref


def test_schedules_survive_preemption(checkpoint, oracle, prompt_ids):
    # 6 blocks of 32 tokens for 6 requests that each grow to 2 blocks; eager:
    # preemption is the scheduler's and runner's, and an engine of its own
    # compiled cost minutes of CI to start
    llm = make_llm(
        checkpoint, max_model_len=128, block_size=32, num_gpu_blocks_override=6,
        disable_log_stats=False, enforce_eager=True,
    )
    try:
        reqs = [(prompt_ids[i], FORCED[i]) for i in range(3)] + [
            (prompt_ids[i], None) for i in range(3, 6)
        ]
        sampling = [
            SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                           extra_args={"drllm_mode": "schedule", "drllm_schedule": list(s)}
                           if s else None)
            for _, s in reqs
        ]
        got = run(llm, [p for p, _ in reqs], sampling)
        preemptions = sum(
            m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"
        )
    finally:
        shutdown(llm)
    assert preemptions > 0, "the KV cache was meant to be small enough to preempt"
    for (p, s), (tokens, schedule) in zip(reqs, got):
        ref_tokens, ref_schedule = oracle.generate(p, 40, schedule=s, stop_at_eos=False)
        assert schedule == ref_schedule
        assert tokens == ref_tokens

