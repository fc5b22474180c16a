"""The second architecture: a small random-weight Qwen2 built by the test."""

from __future__ import annotations

import pytest
import torch

from drllm_vllm.config import DrConfig
from drllm_vllm.schedule import EXECUTE, REPEAT, SKIP

from .conftest import make_llm, shutdown
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
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from drllm_vllm.checkpoint import init_routers, write_dr_checkpoint

    tok = AutoTokenizer.from_pretrained(checkpoint)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256,
        num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=512, tie_word_embeddings=True,
        initializer_range=0.2,  # large weights: well separated logits, no argmax ties
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("qwen2-base")
    Qwen2ForCausalLM(config).to(torch.float32).save_pretrained(base)
    tok.save_pretrained(base)
    out = tmp_path_factory.mktemp("qwen2") / "dr"
    return write_dr_checkpoint(
        base, out, init_routers(LAYERS, 128, 128, seed=1),
        DrConfig(repeat_layers=tuple(range(LAYERS))),
    )


def test_qwen2_schedules_and_routing_match_oracle(qwen2_checkpoint, tokenizer):
    from drllm_vllm.reference import Reference

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
