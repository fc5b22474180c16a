"""Exact prefix caching and chunked prefill under per-request schedules.

One engine with both on, small blocks and a small step budget, so that
prompts of a few hundred tokens hit the cache block by block and chunk.
It runs eagerly: what is tested here (block hashes, salts, routing windows
across chunks) is the same compiled, and a compiled engine of its own cost
about 4 minutes of CI to start (test_compiled.py covers the compiled layers).
Every answer is checked against the no-KV-cache oracle, and the hits are
counted from vLLM's own metrics.
"""

from __future__ import annotations

import pytest
from vllm import SamplingParams

from drllm_vllm import caching, schedule_of
from drllm_vllm.schedule import EXECUTE, REPEAT, SKIP

from .conftest import make_llm, shutdown

L = 30
BLOCK = 32
BUDGET = 96  # max_num_batched_tokens: a 200-token prompt takes three steps
MAX_TOKENS = 5

S1 = tuple(REPEAT if i == 3 else SKIP if i == 12 else EXECUTE for i in range(L))
S2 = tuple(SKIP if i in (0, 29) else REPEAT if i == 5 else EXECUTE for i in range(L))

SYSTEM = (
    "You are a careful assistant for a public library. Answer questions about opening "
    "hours, borrowing rules, fines, membership cards, printing, study rooms, children's "
    "events and the digital catalogue. Be brief and polite. If a question is not about "
    "the library, say that you can only help with library matters. The library opens at "
    "nine in the morning on weekdays and at ten on Saturdays; it is closed on Sundays and "
    "public holidays. Members may borrow up to twelve items for three weeks and renew "
    "them twice online unless someone else has reserved them. Overdue adult items cost "
    "twenty cents a day, children's items cost nothing, and lost cards are replaced for "
    "two dollars at the front desk. Study rooms seat four people and can be booked for "
    "two hours at a time, up to a week ahead, with a valid card. Printing costs ten cents "
    "a page in black and white and fifty cents in colour; scanning is free. Story time "
    "for toddlers is on Tuesday and Thursday mornings in the children's room. "
)


@pytest.fixture(scope="module")
def llm(checkpoint):
    engine = make_llm(
        checkpoint, block_size=BLOCK, max_num_batched_tokens=BUDGET, max_num_seqs=8,
        enable_prefix_caching=True, enable_chunked_prefill=True, disable_log_stats=False,
        enforce_eager=True,
    )
    yield engine
    shutdown(engine)


@pytest.fixture(scope="module")
def prefix(tokenizer):
    ids = tokenizer.encode(SYSTEM)
    assert len(ids) > 4 * BLOCK + BUDGET // 2, "the shared prefix must span several blocks"
    return ids


def hits(llm) -> tuple[int, int]:
    """(prefix-cache hits, queries), in tokens, from vLLM's metrics."""
    m = {x.name: x.value for x in llm.get_metrics()
         if x.name in ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries")}
    return int(m["vllm:prefix_cache_hits"]), int(m["vllm:prefix_cache_queries"])


def generate(llm, prompts, extras, salts=None, lookups=False):
    """[(tokens, schedule)] and the prefix-cache hits (tokens) the call made
    (and, if `lookups`, the tokens of the requests that looked the cache up)."""
    before, asked = hits(llm)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    for i, salt in enumerate(salts or []):
        if salt is not None:
            inputs[i]["cache_salt"] = salt
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                             extra_args=e) for e in extras]
    outs = llm.generate(inputs, params, use_tqdm=False)
    got = [(list(o.outputs[0].token_ids), schedule_of(o)) for o in outs]
    after, asked_after = hits(llm)
    return (got, after - before, asked_after - asked) if lookups else (got, after - before)


def forced(s):
    return {"drllm_mode": "schedule", "drllm_schedule": list(s)}


def test_forced_schedules_sharing_a_prefix_never_share_blocks(llm, oracle, tokenizer, prefix):
    a = prefix + tokenizer.encode("Question: When does the library open on Saturdays?",
                                  add_special_tokens=False)
    b = prefix + tokenizer.encode("Question: How many items may I borrow?",
                                  add_special_tokens=False)
    ref = {(k, s): oracle.generate(p, MAX_TOKENS, schedule=s, stop_at_eos=False)[0]
           for k, p in (("a", a), ("b", b)) for s in (S1, S2)}

    (first_a,), hit = generate(llm, [a], [forced(S1)])
    assert first_a == (ref["a", S1], S1) and hit == 0
    # the same tokens under another schedule: no block is shared
    (first_b,), hit = generate(llm, [b], [forced(S2)])
    assert first_b == (ref["b", S2], S2) and hit == 0
    # one after the other, and together: each reads its own schedule's blocks
    (again_a,), hit_a = generate(llm, [a], [forced(S1)])
    both, hit_both = generate(llm, [a, b], [forced(S1), forced(S2)])
    assert again_a == first_a and both == [first_a, first_b]
    assert hit_a >= len(prefix) // BLOCK * BLOCK
    assert hit_both >= 2 * (len(prefix) // BLOCK * BLOCK)
    # b under a's schedule reads the shared prefix that a computed, and is exact
    (b_under_s1,), hit = generate(llm, [b], [forced(S1)])
    assert b_under_s1 == (ref["b", S1], S1) and hit >= len(prefix) // BLOCK * BLOCK


def test_routed_request_routes_without_the_cache_then_repeats_hit_it(llm, oracle, tokenizer):
    # shorter than the step budget, so the window is the whole prompt
    p = tokenizer.encode(
        "The museum of natural history has a new hall of minerals, with crystals from "
        "every continent, a meteorite you may touch, and a room that glows under "
        "ultraviolet light. Tickets are free for children under twelve, and the hall is "
        "open every day except Monday. Guided tours start at noon and at three. "
        "Question: What can visitors touch? Answer:")
    assert 2 * BLOCK < len(p) < BUDGET - 8
    ref = oracle.generate(p, MAX_TOKENS, stop_at_eos=False)
    # schedule unknown: it routes on its own states and does not even look the cache up
    (first,), hit, looked = generate(llm, [p], [None], lookups=True)
    assert first == ref and hit == 0 and looked == 0
    # known now: the repeat runs under it, from the cache
    (repeat,), hit = generate(llm, [p], [None])
    assert repeat == ref and hit >= len(p) // BLOCK * BLOCK
    # a different bias is a different routing key: routed afresh, without the cache
    (biased,), hit, looked = generate(llm, [p], [{"drllm_bias": -0.4}], lookups=True)
    assert biased == oracle.generate(p, MAX_TOKENS, bias=-0.4, stop_at_eos=False)
    assert hit == 0 and looked == 0
    # twins of a fresh key: each routes (if it arrived while another was
    # routing) or runs under the first one's schedule
    q = p[:-12] + tokenizer.encode(" Question: When do guided tours start? Answer:",
                                   add_special_tokens=False)
    twins, _ = generate(llm, [q, q, q], [None, None, None])
    assert twins == [oracle.generate(q, MAX_TOKENS, stop_at_eos=False)] * 3


def test_pinned_second_turn_reads_the_routed_first_turn(llm, oracle, tokenizer, prefix):
    # turn 1 routed (on its first 64 tokens); turn 2 = turn 1 + answer + a new
    # question, pinned to turn 1's schedule: it reads turn 1's blocks, which
    # the scheduler filed under that schedule once the routers had decided
    turn1 = prefix + tokenizer.encode("Question: Is there a fine for children's books?",
                                      add_special_tokens=False)
    ((answer, schedule),), hit, looked = generate(
        llm, [turn1], [{"drllm_route_tokens": 64}], lookups=True)
    assert (answer, schedule) == oracle.generate(turn1, MAX_TOKENS, route_tokens=64,
                                                 stop_at_eos=False)
    assert hit == 0 and looked == 0
    turn2 = turn1 + answer + tokenizer.encode(" Question: And for adults?",
                                              add_special_tokens=False)
    ((again, same),), hit = generate(llm, [turn2], [forced(schedule)])
    assert (again, same) == oracle.generate(turn2, MAX_TOKENS, schedule=schedule,
                                            stop_at_eos=False)
    assert hit >= len(turn1) // BLOCK * BLOCK


def test_long_routed_prompt_chunks_around_its_window_beside_decodes(llm, oracle, tokenizer,
                                                                     prefix):
    long_prompt = prefix + tokenizer.encode("Question: Is the library open on Sundays?",
                                            add_special_tokens=False)
    assert len(long_prompt) > 2 * BUDGET  # computed over at least three steps
    short = [tokenizer.encode(t) for t in ("The capital of Italy is", "Two plus two is")]
    window = 64
    extras = [{"drllm_route_tokens": window, "drllm_bias": -0.2}, None, {"drllm_mode": "full"},
              {}]  # the last: routed on the whole prompt, clamped to the budget
    got, _ = generate(llm, [long_prompt, *short, long_prompt], extras)
    ref = [
        oracle.generate(long_prompt, MAX_TOKENS, bias=-0.2, route_tokens=window,
                        stop_at_eos=False),
        oracle.generate(short[0], MAX_TOKENS, stop_at_eos=False),
        oracle.generate(short[1], MAX_TOKENS, schedule=(EXECUTE,) * L, stop_at_eos=False),
        oracle.generate(long_prompt, MAX_TOKENS, route_tokens=BUDGET, stop_at_eos=False),
    ]
    assert got == [(t, s) for t, s in ref]


def test_user_cache_salt_still_separates_requests(llm, oracle, tokenizer, prefix):
    p = prefix + tokenizer.encode("Question: Can I print in colour?", add_special_tokens=False)
    ref = oracle.generate(p, MAX_TOKENS, schedule=S2, stop_at_eos=False)[0]
    (alice,), _ = generate(llm, [p], [forced(S2)], salts=["alice"])
    (alice_again,), hit_alice = generate(llm, [p], [forced(S2)], salts=["alice"])
    (bob,), hit_bob = generate(llm, [p], [forced(S2)], salts=["bob"])
    assert alice == alice_again == bob == (ref, S2)
    assert hit_alice >= len(prefix) // BLOCK * BLOCK and hit_bob == 0


def test_salts_combine_and_route_windows_clamp():
    assert caching.combine_salt(None, "drllm:x") == "drllm:x"
    assert caching.combine_salt("user", "drllm:x") == "user|drllm:x"
    assert caching.schedule_salt(S1) != caching.schedule_salt(S2)
    key = caching.routing_key([1, 2, 3, 4], 3, 0, 0.0)
    assert key == caching.routing_key([1, 2, 3, 9], 3, 0, 0.0)  # past the window: same key
    assert key != caching.routing_key([1, 2, 3, 4], 4, 0, 0.0)
    assert key != caching.routing_key([1, 2, 3, 4], 3, 1, 0.0)
    assert key != caching.routing_key([1, 2, 3, 4], 3, 0, -0.1)
    assert caching.private_salt(key, "a") != caching.private_salt(key, "b")
    assert caching.route_end(500, None, 96) == 96
    assert caching.route_end(500, 64, 96) == 64
    assert caching.route_end(50, None, 96) == 50
    assert caching.route_end(50, 80, None) == 50
    assert caching.step_token_budget(2048, 0, True) == 2048
    assert caching.step_token_budget(2048, 512, True) == 512
    assert caching.step_token_budget(2048, 512, False) is None
