"""Several ranks: tensor and data parallelism against one rank; pipeline refused.

A random-weight Qwen2 with even head counts (4 heads, 2 KV heads) runs one
batch that mixes forced schedules, full mode and routed requests, with
repeats, on one engine at tensor_parallel_size=1 and 2, and split between
two data-parallel engines (fp32, CPU, the real engine). All must give the
same tokens and schedules, request by request, and the oracle's. The TP=2
engine starts with VLLM_CPU_OMP_THREADS_BIND unset: the plugin must pick one
core set per rank by itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from drllm_vllm.hooks import BIND_ENV, DrllmConfigError, bind_cpu_ranks
from drllm_vllm.schedule import EXECUTE, REPEAT, SKIP

from .conftest import MAX_MODEL_LEN, make_llm, random_qwen2_checkpoint, shutdown
from .test_engine import MAX_TOKENS, forced, params, run

LAYERS = 4
REPEAT_LAYERS = (0, 1, 3)  # layer 2 may not repeat: routers must respect that
PROMPTS = [
    "Hello there",
    "A much longer prompt about the weather in the mountains today and tomorrow",
    "1 2 3 4 5",
    "Why is the sky blue?",
    "Short",
    "def add(a, b):",
    "The capital of France is",
    "Once upon a time",
    "Water boils at",
]
# one request each, all in one batch: forced (with repeats), full, routed
REQUESTS = [
    forced((SKIP, EXECUTE, EXECUTE, REPEAT)),
    forced((REPEAT, REPEAT, SKIP, EXECUTE)),
    forced((EXECUTE, SKIP, EXECUTE, SKIP)),
    params(drllm_mode="full"),
    params(drllm_mode="full"),
    params(drllm_bias=-0.6),
    params(drllm_bias=0.0),
    params(drllm_bias=0.4),
    params(drllm_bias=0.8),
]
CPUS = len(os.sched_getaffinity(0))
two_cpus = pytest.mark.skipif(
    CPUS < 2, reason=f"tensor_parallel_size=2 needs 2 CPUs, this process may use {CPUS}"
)


@pytest.fixture(scope="module")
def tp_checkpoint(tmp_path_factory, checkpoint):
    return random_qwen2_checkpoint(tmp_path_factory, checkpoint, "qwen2-tp", layers=LAYERS,
                                   hidden=256, heads=4, kv_heads=2,
                                   repeat_layers=REPEAT_LAYERS)


@pytest.fixture(scope="module")
def prompt_ids(checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    return [tok.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def one_rank(tp_checkpoint, prompt_ids):
    """REQUESTS as one batch on one engine, one rank (the reference here)."""
    llm = make_llm(tp_checkpoint)
    try:
        return run(llm, prompt_ids, REQUESTS)
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def two_ranks(tp_checkpoint, prompt_ids):
    """TP=2 results and the binding the plugin chose (the variable unset before)."""
    before = os.environ.pop(BIND_ENV, None)
    try:
        llm = make_llm(tp_checkpoint, tensor_parallel_size=2)
        chosen = os.environ.get(BIND_ENV)
        try:
            results = run(llm, prompt_ids, REQUESTS)
        finally:
            shutdown(llm)
    finally:
        _restore_env(before)
    return results, chosen


def _restore_env(value: str | None) -> None:
    from vllm import envs

    if value is None:
        os.environ.pop(BIND_ENV, None)
    else:
        os.environ[BIND_ENV] = value
    if envs._is_envs_cache_enabled():  # vLLM caches its variables once an engine ran here
        envs.disable_envs_cache()
        envs.enable_envs_cache()


@two_cpus
def test_tensor_parallel_matches_one_rank_token_for_token(one_rank, two_ranks):
    tp2, _ = two_ranks
    diffs = [(i, a, b) for i, (a, b) in enumerate(zip(one_rank, tp2)) if a != b]
    assert len(tp2) == len(one_rank) == len(REQUESTS)
    assert not diffs, f"TP=2 differs from TP=1 (request, TP=1, TP=2): {diffs}"


@two_cpus
def test_the_batch_mixes_modes_and_repeats(one_rank):
    """The comparison above means something: forced, full and routed rows with
    skips and repeats ran side by side."""
    routed = []
    for (_, s), request in zip(one_rank, REQUESTS):
        mode = request.extra_args.get("drllm_mode", "routed")
        if mode == "schedule":
            assert s == tuple(request.extra_args["drllm_schedule"])
        elif mode == "full":
            assert s == (EXECUTE,) * LAYERS
        else:
            routed.append(s)
    assert len(set(routed)) >= 2, f"routed schedules all alike: {routed}"
    assert any(REPEAT in s for s in routed) and any(SKIP in s for s in routed), routed
    assert all(s[2] != REPEAT for s in routed), "layer 2 may not repeat"


@two_cpus
def test_one_rank_matches_the_oracle(tp_checkpoint, prompt_ids, one_rank):
    from drllm_vllm.pipeline.reference import Reference

    oracle = Reference(tp_checkpoint)
    for ids, request, got in zip(prompt_ids, REQUESTS, one_rank):
        x = request.extra_args
        schedule = tuple(x["drllm_schedule"]) if x.get("drllm_mode") == "schedule" else (
            (EXECUTE,) * LAYERS if x.get("drllm_mode") == "full" else None)
        assert got == oracle.generate(ids, MAX_TOKENS, schedule=schedule,
                                      bias=x.get("drllm_bias", 0.0)), x


@two_cpus
def test_plugin_binds_one_core_set_per_rank(two_ranks):
    cpus = sorted(os.sched_getaffinity(0))
    _, chosen = two_ranks
    assert chosen is not None, f"the plugin did not set {BIND_ENV}"
    sets = [s.split(",") for s in chosen.split("|")]
    assert len(sets) == 2 and chosen.count("|") == 1, chosen
    if len(cpus) == 2:
        assert chosen == f"{cpus[0]}|{cpus[1]}"


class _Parallel:  # the fields of vLLM's ParallelConfig that bind_cpu_ranks reads
    def __init__(self, local_world_size: int, data_parallel_size_local: int = 1,
                 distributed_executor_backend: str = "mp"):
        self.local_world_size = local_world_size
        self.data_parallel_size_local = data_parallel_size_local
        self.distributed_executor_backend = distributed_executor_backend


@pytest.fixture
def one_numa_node(monkeypatch):
    from vllm.utils import cpu_resource_utils

    monkeypatch.delenv(BIND_ENV, raising=False)
    monkeypatch.setattr(cpu_resource_utils, "get_visible_memory_node", lambda: [0])


def test_core_sets_split_the_allowed_cores(one_numa_node, monkeypatch):
    """Equal contiguous sets; one core per rank left over once each keeps two."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert bind_cpu_ranks(_Parallel(2)) == "0-2|3-5"
    monkeypatch.delenv(BIND_ENV)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 9})
    assert bind_cpu_ranks(_Parallel(1, data_parallel_size_local=3)) == "4|5|9"
    assert os.environ[BIND_ENV] == "4|5|9"
    # a value the user set is left alone; one rank needs no binding
    assert bind_cpu_ranks(_Parallel(3)) is None
    monkeypatch.delenv(BIND_ENV)
    assert bind_cpu_ranks(_Parallel(1)) is None and BIND_ENV not in os.environ
    # only vLLM's multiprocess executor reads it (not torchrun's external launcher)
    assert bind_cpu_ranks(_Parallel(2, distributed_executor_backend="external_launcher")) is None


def test_more_ranks_than_cores_is_a_clear_error(one_numa_node, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    with pytest.raises(DrllmConfigError, match=r"2 CPU workers .* need at least 2 cores.*"
                       r"may use 1 \(\[0\]\).*VLLM_CPU_OMP_THREADS_BIND"):
        bind_cpu_ranks(_Parallel(2))
    assert BIND_ENV not in os.environ


def test_pipeline_parallelism_is_refused(tp_checkpoint):
    with pytest.raises(ValueError, match=r"cannot run with pipeline parallelism"):
        make_llm(tp_checkpoint, pipeline_parallel_size=2)


@two_cpus
def test_data_parallel_matches_one_rank(tp_checkpoint, prompt_ids, one_rank, tmp_path):
    """data_parallel_size=2 offline: two torchrun processes, one engine each
    (vLLM's external launcher), the batch split between them. Eager, to keep
    CI short: each rank is a plain one-rank engine, whose compiled path the
    TP=1 run above already covers."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "checkpoint": str(tp_checkpoint), "max_model_len": MAX_MODEL_LEN,
        "max_tokens": MAX_TOKENS, "enforce_eager": True,
        "requests": [{"prompt_ids": p, "extra_args": r.extra_args}
                     for p, r in zip(prompt_ids, REQUESTS)],
    }))
    script = Path(__file__).with_name("data_parallel_rank.py")
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    env.pop(BIND_ENV, None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), str(spec), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, f"torchrun failed:\n{done.stderr[-3000:]}"
    got = {}
    for rank in (0, 1):
        for i, (tokens, schedule) in json.loads((tmp_path / f"rank{rank}.json").read_text()).items():
            got[int(i)] = (tokens, tuple(schedule))
    assert sorted(got) == list(range(len(REQUESTS)))
    diffs = [(i, one_rank[i], got[i]) for i in got if got[i] != one_rank[i]]
    assert not diffs, f"DP=2 differs from one engine (request, one engine, DP=2): {diffs}"
