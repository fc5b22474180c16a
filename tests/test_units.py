"""Pure maths against hand-computed answers: windows, decisions, schedules."""

from __future__ import annotations

import math

import pytest
import torch

from drllm_vllm.config import DrConfig, parse_controls
from drllm_vllm.router import decide, num_windows_for, window_means
from drllm_vllm.schedule import (
    allowed_layers, check_schedule, path_to_schedule, schedule_to_path,
)


def test_window_split_drops_the_leftover_and_clamps_w():
    assert num_windows_for(10, 4) == (4, 2)  # tokens 8, 9 dropped
    assert num_windows_for(3, 8) == (3, 1)  # W clamped to T
    x = torch.arange(10.0)[:, None]
    assert window_means(x, 4)[:, 0].tolist() == [0.5, 2.5, 4.5, 6.5]


def test_decide_bias_knob_known_answers():
    logits = torch.tensor([[0.0, 1.0, 0.5]])  # softmax ~ [0.19, 0.51, 0.31]
    assert decide(logits, 0.0).item() == 1
    assert decide(logits, -1.0).item() == 0
    assert decide(logits, 1.0).item() == 2
    # p = -0.4: q_skip = 0.6*0.186 + 0.4 = 0.51 > q_exec = 0.6*0.506 = 0.30
    assert decide(logits, -0.4).item() == 0
    # p = -0.2: q_skip = 0.8*0.186 + 0.2 = 0.35 < q_exec = 0.8*0.506 = 0.40
    assert decide(logits, -0.2).item() == 1
    # per-row biases
    assert decide(logits.repeat(2, 1), torch.tensor([0.0, -1.0])).tolist() == [1, 0]


def test_decide_never_takes_a_disallowed_class_whatever_the_bias():
    wants_skip, wants_repeat = torch.tensor([[5.0, 0.0, 1.0]]), torch.tensor([[1.0, 0.0, 5.0]])
    for p in (-1.0, -0.5, 0.0, 0.5, 1.0):
        assert decide(wants_skip, p, may_skip=False).item() in (1, 2), p
        assert decide(wants_repeat, p, may_repeat=False).item() in (0, 1), p
        assert decide(wants_skip, p, may_skip=False, may_repeat=False).item() == 1, p
    # bias 0 (the fast path) masks too: the best allowed class
    assert decide(wants_skip, 0.0, may_skip=False).item() == 2
    assert decide(wants_repeat, 0.0, may_repeat=False).item() == 0
    assert decide(wants_repeat.repeat(2, 1), torch.tensor([0.0, 0.0]), may_repeat=False).tolist() == [0, 0]


def test_a_layer_with_no_choice_executes_whatever_its_router_says():
    # The serving loop skips the router of such a layer (DrConfig.has_choice):
    # decide must then answer execute for any logits and any bias.
    cfg = DrConfig(skip_layers=(1,), repeat_layers=(2,))
    assert [cfg.has_choice(i) for i in range(4)] == [False, True, True, False]
    assert DrConfig().has_choice(7)  # no skip_layers: every layer may skip
    logits = torch.randn(64, 3, generator=torch.Generator().manual_seed(0)) * 5
    for p in (-1.0, -0.3, 0.0, 0.3, 1.0):
        assert decide(logits, p, may_skip=False, may_repeat=False).eq(1).all(), p


def test_decide_positive_bias_moves_to_execute_where_repeat_is_not_allowed():
    # softmax over skip/execute of [1, 0]: [0.73, 0.27]; target execute
    logits = torch.tensor([[1.0, 0.0, 9.0]])
    # p = 0.4: q_exec = 0.6*0.27 + 0.4 = 0.56 > q_skip = 0.6*0.73 = 0.44
    assert decide(logits, 0.4, may_repeat=False).item() == 1
    # p = 0.2: q_exec = 0.8*0.27 + 0.2 = 0.42 < q_skip = 0.8*0.73 = 0.58
    assert decide(logits, 0.2, may_repeat=False).item() == 0
    assert decide(logits, 1.0, may_repeat=False).item() == 1


def test_decide_negative_bias_leaves_the_router_where_skip_is_not_allowed():
    logits = torch.tensor([[9.0, 0.0, 1.0], [9.0, 1.0, 0.0]])
    for p in (-1.0, -0.5, -0.1):
        assert decide(logits, p, may_skip=False).tolist() == [2, 1], p


def test_decide_is_monotone_in_the_bias_on_random_logits():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 3, generator=gen) * 2
    biases = torch.linspace(-1, 1, 41)
    for may_skip in (True, False):
        for may_repeat in (True, False):
            layers = torch.stack([decide(logits, float(p), may_skip, may_repeat) for p in biases])
            assert (layers[1:] >= layers[:-1]).all(), (may_skip, may_repeat)
            assert layers[-1].tolist() == [2 if may_repeat else 1] * 500
            if may_skip:
                assert layers[0].tolist() == [0] * 500


def test_allowed_layers_known_answers():
    labels = [(1, 0, 1, 1), (1, 0, 0, 1), (1, 0, 2, 1), (0, 1, 2, 2)]
    got = allowed_layers(labels, 4, min_labels=2)
    assert got["skip_counts"] == [1, 3, 1, 0] and got["repeat_counts"] == [0, 0, 2, 1]
    assert got["skip_layers"] == [1] and got["repeat_layers"] == [2]
    assert got["labelled"] == 4 and got["min_labels"] == 2
    one = allowed_layers(labels, 4, min_labels=1)  # every action the search ever took
    assert one["skip_layers"] == [0, 1, 2] and one["repeat_layers"] == [2, 3]
    assert allowed_layers([], 3)["skip_layers"] == []  # no labels: nothing may skip
    with pytest.raises(ValueError, match=r"label 1 has 3 actions, expected one per layer \(4\)"):
        allowed_layers([(1, 1, 1, 1), (1, 1, 1)], 4)
    with pytest.raises(ValueError, match=r"label 0\[2\] = 3"):
        allowed_layers([(1, 1, 3, 1)], 4)
    with pytest.raises(ValueError, match="min_labels = 0"):
        allowed_layers(labels, 4, min_labels=0)


def test_allowed_layers_on_the_shipped_labels():
    import json

    from drllm_vllm.checkpoint import ROUTER_WEIGHTS_DIR

    path = ROUTER_WEIGHTS_DIR / "smollm2-135m-instruct" / "search.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    got = allowed_layers([r["best"] for r in records if r["best"] is not None], 30)
    assert got["labelled"] == 645
    assert got["skip_layers"] == [*range(20), 21, 24, 25, 26]
    assert got["repeat_layers"] == []  # one repeat label in all (layer 13)


def test_skip_layers_default_and_validation():
    assert DrConfig().may_skip(7)  # no skip_layers: a checkpoint from before them
    cfg = DrConfig(skip_layers=(3, 1, 3), repeat_layers=(2,))
    assert cfg.skip_layers == (1, 3)
    assert [cfg.may_skip(i) for i in range(4)] == [False, True, False, True]
    assert [cfg.may_repeat(i) for i in range(4)] == [False, False, True, False]
    from types import SimpleNamespace

    from drllm_vllm.config import parse_drllm_block

    with pytest.raises(ValueError, match=r"skip_layers \[4\] out of range for 4 layers"):
        parse_drllm_block(SimpleNamespace(num_hidden_layers=4, drllm={"skip_layers": [1, 4]}))
    with pytest.raises(ValueError, match=r"skip_layers.*>= 0"):
        parse_drllm_block(SimpleNamespace(num_hidden_layers=4, drllm={"skip_layers": [-1]}))


def test_forced_skip_outside_skip_layers_is_accepted_repeat_is_not():
    cfg = DrConfig(skip_layers=(1,), repeat_layers=(2,))
    c = parse_controls({"drllm_mode": "schedule", "drllm_schedule": [0, 1, 2, 0]}, 4, cfg)
    assert c.schedule == (0, 1, 2, 0)
    with pytest.raises(ValueError, match=r"layer 3 may not repeat.*\[2\]"):
        parse_controls({"drllm_mode": "schedule", "drllm_schedule": [1, 1, 1, 2]}, 4, cfg)


def test_schedule_path_round_trip():
    s = (1, 0, 2, 1)
    assert schedule_to_path(s) == (0, 2, 2, 3)
    assert path_to_schedule((0, 2, 2, 3), 4) == s
    with pytest.raises(ValueError, match="not an ordered path"):
        path_to_schedule((0, 0, 0, 1), 4)


def test_check_schedule_errors_name_the_value():
    with pytest.raises(ValueError, match=r"drllm_schedule\[2\] = 3"):
        check_schedule([1, 1, 3], 3)
    with pytest.raises(ValueError, match=r"layer 0 may not repeat.*\[1\]"):
        check_schedule([2, 1, 1], 3, repeat_layers=[1])
    with pytest.raises(ValueError, match=r"drllm_schedule\[0\] = True"):
        check_schedule([True, 1, 1], 3)


@pytest.mark.parametrize("bias", [math.nan, math.inf, -1.5, True])
def test_controls_reject_bad_bias(bias):
    with pytest.raises(ValueError, match="drllm_bias"):
        parse_controls({"drllm_bias": bias}, 4, DrConfig())


def test_controls_defaults_come_from_the_checkpoint():
    c = parse_controls(None, 4, DrConfig(default_mode="full", default_bias=-0.3))
    assert (c.mode, c.bias, c.schedule) == ("full", -0.3, None)


def test_step_batch_row_sets_and_token_positions_known_answers():
    import numpy as np

    from drllm_vllm.batch import StepBatch, token_positions

    # rows hold 3, 1, 4 and 1 tokens
    q = np.array([0, 3, 4, 8, 9], dtype=np.int32)
    assert token_positions(q, (0, 2)).tolist() == [0, 1, 2, 4, 5, 6, 7]
    assert token_positions(q, (1, 3)).tolist() == [3, 8]
    assert token_positions(q, (3,)).tolist() == [8]
    step = StepBatch(
        req_ids=["a", "b", "c", "d"], query_start=q,
        schedules=[(1, 1, 2), (1, 0, 1), (1, 1, 1), (1, 0, 2)], to_route=[],
        attention_for_rows=None, num_layers=3,
    )
    assert step.rows_running(0, False) is step.all_rows
    assert step.rows_running(0, True) == ()
    assert step.rows_running(1, False) == (0, 2)
    assert step.rows_running(2, True) == (0, 3)
    assert step.token_index((0, 2)).tolist() == [0, 1, 2, 4, 5, 6, 7]
    assert step.layer_passes() == 4  # layers 0, 1, 2 and layer 2's second pass
    assert step.applications().tolist() == [4, 2, 3, 3]
    # layer 1: rows 1 and 3 (2 tokens) skip it while the others run it
    assert step.rows_to_restore((0, 2)) == (1, 3)
    # 7 of 9 tokens outside rows (1, 3): more than 4 and than a quarter of 9
    assert step.rows_to_restore((1, 3)) is None
    # a prefill of 40 tokens: a 9-token row outside is under a quarter (10)
    long = StepBatch(req_ids=list("abcd"), query_start=np.array([0, 9, 20, 31, 40]),
                     schedules=[(1,)] * 4, to_route=[], attention_for_rows=None, num_layers=1)
    assert long.rows_to_restore((1, 2, 3)) == (0,)
    assert long.rows_to_restore((2, 3)) is None  # 20 tokens outside

    def again(req_ids=("a", "b", "c", "d"), q=q, last=(1, 0, 2)):
        return StepBatch(
            req_ids=list(req_ids), query_start=q.copy(),
            schedules=[(1, 1, 2), (1, 0, 1), (1, 1, 1), last], to_route=[],
            attention_for_rows=None, num_layers=3,
        )

    # the next step of the same batch takes over the row sets and indices...
    same = again()
    same.reuse(step)
    assert same._token_index is step._token_index and same.rows_running(1, False) == (0, 2)
    # ...a step that differs in rows, tokens or schedules works out its own
    for other in (again(req_ids="abce"), again(q=np.array([0, 3, 4, 9, 10], dtype=np.int32)),
                  again(last=(1, 1, 2))):
        other.reuse(step)
        assert other._token_index is not step._token_index
    assert again(last=(1, 1, 2)).rows_running(1, False) == (0, 2, 3)


def test_route_window_clamps_to_the_prompt():
    from drllm_vllm.router import route_window

    assert route_window(10, None) == (0, 10)
    assert route_window(10, 4) == (0, 4)
    assert route_window(10, 40, 3) == (3, 10)
    assert route_window(10, 6, 2) == (2, 6)
    assert route_window(10, None, 12) == (9, 10)  # at least the last token


def test_default_dtype_is_bf16_only_where_the_cpu_computes_it(monkeypatch):
    from drllm_vllm.config import default_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    epyc = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma f16c\n"
    sapphire = "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    graviton = "Features\t: fp asimd bf16 i8mm\n"
    assert default_dtype(epyc) == "float32"
    assert default_dtype(epyc.replace("avx2", "avx2 avx512f avx512bw")) == "float32"
    assert default_dtype(sapphire) == "bfloat16"
    assert default_dtype(graviton) == "bfloat16"
    assert default_dtype("") == "float32"


def test_prepare_rebuilds_a_cached_checkpoint_whose_drllm_block_is_stale(tmp_path, monkeypatch):
    import json
    import os

    from drllm_vllm import checkpoint as ck

    model = "smollm2-135m-instruct"
    monkeypatch.setenv("DRLLM_CACHE", str(tmp_path))
    base = tmp_path / "base" / model  # as de-quantized before: not again
    base.mkdir(parents=True)
    plain = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30, "hidden_size": 576}
    (base / "config.json").write_text(json.dumps(plain))
    (base / "model.safetensors").write_bytes(b"")
    (base / "tokenizer.json").write_text("{}")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")
    written = []
    monkeypatch.setattr(ck, "fetch_gguf", lambda src, root: gguf)
    monkeypatch.setattr(ck, "dequantize", lambda gguf, out, sha: pytest.fail("de-quantized"))
    monkeypatch.setattr(ck, "write_dr_checkpoint", lambda b, o, r, drllm: written.append(drllm))
    out = tmp_path / "checkpoints" / f"{model}-drllm"
    out.mkdir(parents=True)
    os.link(base / "model.safetensors", out / "model.safetensors")

    def cache(block):
        (out / "config.json").write_text(json.dumps({**plain, "drllm": block}))

    fresh = ck.drllm_block(ck.shipped_routers(model), "derived", 30).model_dump(mode="json")
    cache(fresh)
    assert ck.prepare(model) == out and written == []  # up to date: reused
    (base / "model.safetensors").unlink()  # another base model under the same name
    (base / "model.safetensors").write_bytes(b"other weights")
    assert ck.prepare(model) == out and len(written) == 1
    # as written before skip_layers existed: every layer may repeat
    cache({k: v for k, v in fresh.items() if k != "skip_layers"} | {"repeat_layers": list(range(30))})
    assert ck.prepare(model) == out
    assert written[-1].repeat_layers == () and written[-1].skip_layers == (*range(20), 21, 24, 25, 26)
    assert written[-1].router_card["allow"]["min_labels"] == 10
    every = ck.prepare(model, allow="all")
    assert every.name == f"{model}-drllm-all-layers"
    assert written[-1].skip_layers is None and written[-1].repeat_layers == tuple(range(30))
    with pytest.raises(ValueError, match=r"allow = 'some' is not accepted; use one of \('derived', 'all'\)"):
        ck.prepare(model, allow="some")


def test_routing_stats_take_models_of_several_depths_in_one_process():
    from drllm_vllm.serving import RoutingStats

    stats = RoutingStats()
    stats.record("a", {"schedule": [1, 0], "layer_applications": 1})  # a 2-layer model first
    stats.record("b", {"schedule": [2, 1, 0], "layer_applications": 3})
    assert [row["skip"] for row in stats.summary()["layers"]] == [0, 1, 1]
    assert [row["repeat"] for row in stats.summary()["layers"]] == [1, 0, 0]


def test_search_records_name_their_prompt_format():
    from drllm_vllm.pipeline.search import record_format

    # records written before formats existed were searched in the task's default
    assert record_format({"task": "arc_easy", "doc_id": 1, "shots": 0}) == "zero-shot"
    assert record_format({"task": "arithmetic", "doc_id": 1, "shots": 5}) == "five-shot"
    assert record_format({"task": "arc_easy", "doc_id": 1, "format": "chat"}) == "chat"


def test_cpu_kv_cache_fits_the_model_and_the_free_memory():
    from drllm_vllm.caching import default_kv_cache_bytes

    # SmolLM2-135M: 30 layers, 3 KV heads of 64; bf16: 2*30*3*64*2 = 23,040 bytes a token
    cfg = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "hidden_size": 576, "drllm": {"repeat_layers": []}}
    size, tokens = default_kv_cache_bytes(cfg, 2, 8192, 16 * 2**30)
    assert (size, tokens) == (131072 * 23040, 131072)
    # repeat layers carry their own cache
    rep = default_kv_cache_bytes({**cfg, "drllm": {"repeat_layers": [0, 1]}}, 2, 8192, 16 * 2**30)
    assert rep[0] == 131072 * 2 * 32 * 3 * 64 * 2
    # little memory free: capped at 40% of it, but never below one sequence
    assert default_kv_cache_bytes(cfg, 2, 8192, 2**30)[1] == int(0.4 * 2**30) // 23040
    assert default_kv_cache_bytes(cfg, 2, 8192, 2**20)[1] == 8192
    # long contexts ask for four sequences; head_dim from hidden size when absent
    cfg2 = {k: v for k, v in cfg.items() if k != "drllm"}
    assert default_kv_cache_bytes(cfg2, 4, 65536, 2**40)[1] == 4 * 65536


def test_scoring_step_keeps_prompt_logits_under_the_budget():
    from drllm_vllm.pipeline.scoring import PROMPT_LOGITS_PER_STEP, step_tokens

    assert step_tokens(49_152) == 4096  # SmolLM2: unchanged
    assert step_tokens(151_936) == 1024  # Qwen2.5: 4096 ran the worker out of memory
    assert step_tokens(10**9) == 512  # the floor
    for vocab in (32_000, 49_152, 151_936, 262_144):
        n = step_tokens(vocab)
        assert n * vocab <= PROMPT_LOGITS_PER_STEP or n == 512
        assert n == 4096 or 2 * n * vocab > PROMPT_LOGITS_PER_STEP


def test_eval_result_files_keep_a_dotted_model_name():
    from pathlib import Path

    from drllm_vllm.pipeline.evaluate import _beside

    stem = Path("benchmarks/results/eval_qwen2.5-coder-0.5b-instruct")
    assert _beside(stem, ".json").name == "eval_qwen2.5-coder-0.5b-instruct.json"
    assert _beside(stem, "_pareto.png").name == "eval_qwen2.5-coder-0.5b-instruct_pareto.png"


def test_drllm_block_is_parsed_once_per_block_and_again_after_an_in_place_change():
    from types import SimpleNamespace

    from drllm_vllm import hooks

    cfg = SimpleNamespace(drllm={"num_windows": 4, "skip_layers": [0, 2]}, num_hidden_layers=3)
    first = hooks._drllm_of(cfg)
    assert first.skip_layers == (0, 2) and first.num_windows == 4
    assert hooks._drllm_of(cfg) is first  # memoised: no re-parse per request
    cfg.drllm["skip_layers"] = [1]  # changed in place: parsed again, not a stale answer
    assert hooks._drllm_of(cfg).skip_layers == (1,)
    cfg.drllm["num_windows"] = 0
    with pytest.raises(ValueError, match="num_windows"):
        hooks._drllm_of(cfg)


def test_layer_action_metrics_count_each_layer_and_action_across_requests():
    from prometheus_client import REGISTRY

    from drllm_vllm.serving import _observe_metrics

    def count(layer: str, action: str) -> float:
        return REGISTRY.get_sample_value("drllm_layer_actions_total",
                                         {"layer": layer, "action": action}) or 0.0

    before = {(l, a): count(l, a) for l in ("0", "1", "2") for a in ("skip", "execute", "repeat")}
    _observe_metrics([0, 1, 2], 3)
    _observe_metrics([0, 1, 1], 2)  # children are cached after the first request
    _observe_metrics([1, 1, 2], 4)
    delta = {k: count(*k) - v for k, v in before.items()}
    assert delta == {("0", "skip"): 2, ("0", "execute"): 1, ("0", "repeat"): 0,
                     ("1", "skip"): 0, ("1", "execute"): 3, ("1", "repeat"): 0,
                     ("2", "skip"): 0, ("2", "execute"): 1, ("2", "repeat"): 2}
