"""Shared fixtures: one real engine per checkpoint for the whole session.

Engines are expensive (tens of seconds each on 2 cores), so every test that
can use the default Dr.LLM engine shares `dr_llm`; tests that need other
settings build theirs once per module.
"""

from __future__ import annotations

import gc
import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAX_MODEL_LEN = 512
# prompts of several lengths and kinds, shared by the engine tests
PROMPTS = [
    "The capital of France is",
    "Question: What is 12 plus 7? Answer:",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
    "List three colours of the rainbow:",
    "Water boils at a temperature of",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Photosynthesis is the process by which plants",
    "In 1969, the first humans landed on",
]


def schedule_of_changes(layers: int, **changes: int) -> tuple[int, ...]:
    """All-execute schedule of `layers` with changes by name: l3=SKIP, l9=REPEAT."""
    from drllm_vllm.schedule import EXECUTE

    s = [EXECUTE] * layers
    for k, v in changes.items():
        s[int(k[1:])] = v
    return tuple(s)


def make_llm(model: str, **kwargs):
    from vllm import LLM

    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("max_model_len", MAX_MODEL_LEN)
    kwargs.setdefault("seed", 0)
    return LLM(model=str(model), **kwargs)


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="session")
def checkpoint():
    """The default model and routers with every layer allowed to skip and
    repeat (`drllm prepare --allow all`): engine tests force repeats at any
    layer. tests/test_allow.py runs the default checkpoint (`default_checkpoint`),
    whose skip and repeat layers are derived from the search labels."""
    from drllm_vllm.checkpoint import prepare

    return prepare(allow="all")


@pytest.fixture(scope="session")
def default_checkpoint():
    from drllm_vllm.checkpoint import prepare

    return prepare()


@pytest.fixture(scope="session")
def dr_llm(checkpoint):
    llm = make_llm(checkpoint)
    yield llm
    shutdown(llm)


@pytest.fixture(scope="session")
def oracle(checkpoint):
    from drllm_vllm.pipeline.reference import Reference

    return Reference(checkpoint)


@pytest.fixture(scope="session")
def tokenizer(dr_llm):
    return dr_llm.get_tokenizer()


def random_base(tmp_path_factory, checkpoint, name: str, *, family: str, layers: int,
                hidden: int, heads: int, kv_heads: int):
    """A plain Hugging Face folder of a random-weight causal LM of `family`
    (a transformers model type: llama, qwen2, qwen3; fp32 safetensors, the
    default model's tokenizer), written under pytest's tmp dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    config = AutoConfig.for_model(
        family, vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden // heads, max_position_embeddings=512, tie_word_embeddings=True,
        initializer_range=0.2,  # large weights: well separated logits, no argmax ties
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp(f"{name}-base")
    AutoModelForCausalLM.from_config(config).to(torch.float32).save_pretrained(base)
    tok.save_pretrained(base)
    return base


def random_qwen2_checkpoint(tmp_path_factory, checkpoint, name: str, *, layers: int,
                            hidden: int, heads: int, kv_heads: int,
                            repeat_layers: tuple[int, ...]):
    """A Dr.LLM checkpoint of a random-weight Qwen2 (`random_base`; routers
    initialised with seed 1), written under pytest's tmp dir."""
    from drllm_vllm.checkpoint import init_routers, write_dr_checkpoint
    from drllm_vllm.config import DrConfig

    base = random_base(tmp_path_factory, checkpoint, name, family="qwen2", layers=layers,
                       hidden=hidden, heads=heads, kv_heads=kv_heads)
    return write_dr_checkpoint(
        base, tmp_path_factory.mktemp(name) / "dr", init_routers(layers, hidden, 128, seed=1),
        DrConfig(repeat_layers=repeat_layers),
    )
