"""Skip and repeat allow-lists and the bias knob, engine against the oracle.

A tiny random Qwen2 whose routers are biased towards actions its layers do
not allow checks the allow-lists at every bias; the default checkpoint (its
lists derived from the shipped search labels) checks the knob's range and
monotonicity against known answers and the oracle (fp32).
"""

from __future__ import annotations

import json

import pytest
import torch

from drllm_vllm.config import DrConfig
from drllm_vllm.schedule import EXECUTE, REPEAT, SKIP

from .conftest import PROMPTS, make_llm, shutdown
from .test_engine import params, run

BIASES = (-1.0, -0.5, 0.0, 0.5, 1.0)
LAYERS = 6
SKIP_LAYERS = (1, 2, 4)
REPEAT_LAYERS = (2, 5)
# fc2 biases (skip, execute, repeat) that pull each router towards what its
# layer may not do; None: the random router as initialised
PULL = {0: (4.0, 0.0, 4.0), 1: (0.0, 0.0, 4.0), 3: (4.0, -4.0, 4.0), 5: (4.0, 0.0, 0.0)}


@pytest.fixture(scope="module")
def tok(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, checkpoint):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from drllm_vllm.checkpoint import init_routers, write_dr_checkpoint

    tok = AutoTokenizer.from_pretrained(checkpoint)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256,
        num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("allow-base")
    Qwen2ForCausalLM(config).to(torch.float32).save_pretrained(base)
    tok.save_pretrained(base)
    routers = init_routers(LAYERS, 128, 128, seed=2)
    for i, pull in PULL.items():
        routers[f"model.routers.{i}.fc2.bias"] = torch.tensor(pull)
    return write_dr_checkpoint(
        base, tmp_path_factory.mktemp("allow") / "dr", routers,
        DrConfig(skip_layers=SKIP_LAYERS, repeat_layers=REPEAT_LAYERS),
    )


def test_allow_lists_hold_at_every_bias_and_match_the_oracle(tiny, tok):
    from drllm_vllm.pipeline.reference import Reference

    oracle = Reference(tiny)
    prompts = [tok.encode(p) for p in PROMPTS[:4]]
    llm = make_llm(tiny)
    try:  # every (prompt, bias) in one batch
        got = run(llm, [p for p in prompts for _ in BIASES],
                  [params(drllm_bias=b) for _ in prompts for b in BIASES])
    finally:
        shutdown(llm)
    seen = set()
    for k, (tokens, schedule) in enumerate(got):
        p, b = prompts[k // len(BIASES)], BIASES[k % len(BIASES)]
        assert (tokens, schedule) == oracle.generate(p, 6, bias=b), (k, b)
        for i, a in enumerate(schedule):
            assert a != SKIP or i in SKIP_LAYERS, (b, schedule)
            assert a != REPEAT or i in REPEAT_LAYERS, (b, schedule)
            seen.add((i, a))
        # the ends of the knob: every layer that may take its target takes it
        if b == -1.0:
            assert all(schedule[i] == SKIP for i in SKIP_LAYERS), schedule
        if b == 1.0:
            assert schedule == (EXECUTE, EXECUTE, REPEAT, EXECUTE, EXECUTE, REPEAT)
    # the pulled routers are masked, not merely unlikely: layer 0 and 3 only execute
    assert {a for i, a in seen if i in (0, 3)} == {EXECUTE}
    assert (5, REPEAT) in seen and (1, SKIP) in seen


def test_knob_is_monotone_in_layers_on_the_default_checkpoint(default_checkpoint, tok):
    from drllm_vllm.pipeline.reference import Reference

    drllm = json.loads((default_checkpoint / "config.json").read_text())["drllm"]
    skip_layers, repeat_layers = drllm["skip_layers"], drllm["repeat_layers"]
    assert repeat_layers == [] and len(skip_layers) == 24  # derived: see the card's "allow"
    prompts = [tok.encode(p) for p in PROMPTS]
    llm = make_llm(default_checkpoint)
    try:
        got = {b: run(llm, prompts, params(drllm_bias=b)) for b in BIASES}
    finally:
        shutdown(llm)
    oracle = Reference(default_checkpoint)
    mean_layers = []
    for b in BIASES:
        for p, (_, schedule) in zip(prompts, got[b]):
            assert schedule == oracle.forward(p, bias=b)[1], b
            assert all(a != SKIP or i in skip_layers for i, a in enumerate(schedule)), b
            assert REPEAT not in schedule
        mean_layers.append(sum(sum(s) for _, s in got[b]) / len(prompts))
    # known ends: -1 skips every layer that may skip; +1 (no layer may repeat)
    # executes every layer
    assert mean_layers[0] == 30 - len(skip_layers)
    assert mean_layers[-1] == 30
    assert mean_layers == sorted(mean_layers), mean_layers
    assert mean_layers[1] < mean_layers[2]  # -0.5 does skip more than the routers alone
    # tokens against the oracle at the knob's ends and at 0 (the fast path)
    for b in (-1.0, 0.0, 1.0):
        for p, (tokens, _) in list(zip(prompts, got[b]))[:3]:
            assert tokens == oracle.generate(p, 6, bias=b)[0], b
