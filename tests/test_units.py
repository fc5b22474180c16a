"""Pure maths against hand-computed answers: windows, decisions, schedules."""

from __future__ import annotations

import math

import pytest
import torch

from drllm_vllm.config import DrConfig, parse_controls
from drllm_vllm.router import decide, num_windows_for, window_means
from drllm_vllm.schedule import check_schedule, path_to_schedule, schedule_to_path


def test_window_split_drops_the_leftover_and_clamps_w():
    assert num_windows_for(10, 4) == (4, 2)  # tokens 8, 9 dropped
    assert num_windows_for(3, 8) == (3, 1)  # W clamped to T
    x = torch.arange(10.0)[:, None]
    assert window_means(x, 4)[:, 0].tolist() == [0.5, 2.5, 4.5, 6.5]


def test_decide_bias_knob_known_answers():
    logits = torch.tensor([[0.0, 1.0, 0.5]])  # softmax ~ [0.19, 0.51, 0.31]
    assert decide(logits, 0.0, True).item() == 1
    assert decide(logits, -1.0, True).item() == 0
    assert decide(logits, 1.0, True).item() == 2
    # p = -0.4: q_skip = 0.6*0.186 + 0.4 = 0.51 > q_exec = 0.6*0.506 = 0.30
    assert decide(logits, -0.4, True).item() == 0
    # p = -0.2: q_skip = 0.8*0.186 + 0.2 = 0.35 < q_exec = 0.8*0.506 = 0.40
    assert decide(logits, -0.2, True).item() == 1
    # repeat not allowed: a positive bias leaves the router's choice
    assert decide(torch.tensor([[0.0, 0.1, 5.0]]), 1.0, False).item() == 1
    # per-row biases
    assert decide(logits.repeat(2, 1), torch.tensor([0.0, -1.0]), True).tolist() == [1, 0]


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


def test_route_window_clamps_to_the_prompt():
    from drllm_vllm.router import route_window

    assert route_window(10, None) == (0, 10)
    assert route_window(10, 4) == (0, 4)
    assert route_window(10, 40, 3) == (3, 10)
    assert route_window(10, 6, 2) == (2, 6)
    assert route_window(10, None, 12) == (9, 10)  # at least the last token


def test_default_dtype_is_bf16_only_where_the_cpu_computes_it(monkeypatch):
    from drllm_vllm.scoring import default_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    epyc = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma f16c\n"
    sapphire = "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    graviton = "Features\t: fp asimd bf16 i8mm\n"
    assert default_dtype(epyc) == "float32"
    assert default_dtype(epyc.replace("avx2", "avx2 avx512f avx512bw")) == "float32"
    assert default_dtype(sapphire) == "bfloat16"
    assert default_dtype(graviton) == "bfloat16"
    assert default_dtype("") == "float32"
