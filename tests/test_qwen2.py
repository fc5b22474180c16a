"""The second architecture: a small random-weight Qwen2 built by the test."""

from __future__ import annotations

import pytest

from drllm_vllm.schedule import EXECUTE, REPEAT, SKIP

from .conftest import make_llm, random_qwen2_checkpoint, shutdown
from .test_engine import forced, params, run

LAYERS = 4
SCHEDULES = [
    (EXECUTE,) * LAYERS,
    (SKIP, EXECUTE, EXECUTE, EXECUTE),
    (EXECUTE, EXECUTE, EXECUTE, SKIP),
    (REPEAT, SKIP, EXECUTE, REPEAT),
    (EXECUTE, REPEAT, REPEAT, EXECUTE),
]


@pytest.fixture(scope="module")
def qwen2_checkpoint(tmp_path_factory, checkpoint):
    return random_qwen2_checkpoint(tmp_path_factory, checkpoint, "qwen2", layers=LAYERS,
                                   hidden=128, heads=2, kv_heads=1,
                                   repeat_layers=tuple(range(LAYERS)))


def test_qwen2_schedules_and_routing_match_oracle(qwen2_checkpoint, tokenizer):
    from drllm_vllm.pipeline.reference import Reference

    oracle = Reference(qwen2_checkpoint)
    prompts = [tokenizer.encode(p) for p in (
        "Hello there", "A much longer prompt about the weather in the mountains today",
        "1 2 3 4 5", "Why is the sky blue?", "Short",
    )]
    llm = make_llm(qwen2_checkpoint)
    try:
        alone = [run(llm, [p], forced(s))[0] for p, s in zip(prompts, SCHEDULES)]
        together = run(llm, prompts, [forced(s) for s in SCHEDULES])
        routed = run(llm, prompts, [params(drllm_bias=b) for b in (0, -0.5, 0.5, 0, 0.3)])
    finally:
        shutdown(llm)
    for p, s, a, t in zip(prompts, SCHEDULES, alone, together):
        ref, _ = oracle.generate(p, 6, schedule=s)
        assert a == t == (ref, s)
    for p, b, r in zip(prompts, (0, -0.5, 0.5, 0, 0.3), routed):
        assert r == oracle.generate(p, 6, bias=b)
