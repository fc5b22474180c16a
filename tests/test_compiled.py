"""Compiled layers against eager execution and the oracle (fp32, CPU, real engines).

The default engine (`dr_llm`) compiles as stock vLLM does: steps in which
every row runs every layer use vLLM's compiled model forward, all other steps
run the routed loop in Python with each layer through one shared compiled
graph (drllm_vllm/compile.py). A Python branch frozen at trace time, a layer
input baked in as a constant (a layer's weights, its KV cache name) or a
token dimension that is not really dynamic would show here as tokens or
schedules that differ from the eager engine's and the oracle's.
"""

from __future__ import annotations

import pytest
from vllm import SamplingParams

from drllm_vllm import schedule_of
from drllm_vllm.schedule import EXECUTE, REPEAT, SKIP

from .conftest import PROMPTS, make_llm, shutdown

L = 30
MAX_TOKENS = 6


def _schedule(skip=(), repeat=()) -> list[int]:
    return [SKIP if i in skip else REPEAT if i in repeat else EXECUTE for i in range(L)]


# one request of each kind, cycled to fill a batch: row subsets (gathered and
# restored), repeats through the virtual attention, routed rows, full rows
KINDS = [
    {"drllm_mode": "schedule", "drllm_schedule": _schedule(skip=(3, 4, 17), repeat=(9,))},
    {"drllm_bias": -0.4},
    {"drllm_mode": "full"},
    {"drllm_mode": "schedule", "drllm_schedule": _schedule(skip=(0, 29), repeat=(5, 20))},
    {"drllm_bias": 0.0},
    {"drllm_mode": "schedule", "drllm_schedule": _schedule(skip=tuple(range(2, 30, 3)))},
]


@pytest.fixture(scope="module")
def eager_llm(checkpoint):
    llm = make_llm(checkpoint, enforce_eager=True)
    yield llm
    shutdown(llm)


def _run(llm, prompts, extras):
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                             extra_args=e) for e in extras]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), schedule_of(o)) for o in outs]


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_compiled_equals_eager_on_mixed_batches(dr_llm, eager_llm, tokenizer, batch):
    prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
    extras = [KINDS[(i + batch) % len(KINDS)] for i in range(batch)]
    compiled = _run(dr_llm, prompts, extras)
    eager = _run(eager_llm, prompts, extras)
    assert compiled == eager
    for e, (_, schedule) in zip(extras, compiled):
        if e.get("drllm_mode") == "schedule":
            assert list(schedule) == e["drllm_schedule"]
    stats = dr_llm.collective_rpc("drllm_stats")[0]
    assert stats["layer_graph_compiled"] == 1, "the default engine should run compiled layers"
    assert stats["layer_graph_direct"] == 1, "layer calls should skip AOT autograd's wrappers"
    assert eager_llm.collective_rpc("drllm_stats")[0]["layer_graph_compiled"] == 0


def test_compiled_mixed_batch_equals_oracle(dr_llm, oracle, tokenizer):
    prompts = [tokenizer.encode(p) for p in PROMPTS[:6]]
    got = _run(dr_llm, prompts, KINDS)
    for p, e, (tokens, schedule) in zip(prompts, KINDS, got):
        kw = ({"schedule": tuple(e["drllm_schedule"])} if e.get("drllm_mode") == "schedule"
              else {"schedule": (EXECUTE,) * L} if e.get("drllm_mode") == "full"
              else {"bias": e["drllm_bias"]})
        ref_tokens, ref_schedule = oracle.generate(p, MAX_TOKENS, stop_at_eos=False, **kw)
        assert schedule == ref_schedule
        assert tokens == ref_tokens, f"compiled differs from the oracle for {e}"
