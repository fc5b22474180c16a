"""Bad controls and bad checkpoints fail with clear errors, not deep tracebacks."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from .conftest import make_llm

BAD_CONTROLS = [
    ({"drllm_mode": "fast"}, r"drllm_mode = 'fast'.*routed.*full.*schedule"),
    ({"drllm_mode": "schedule"}, r"needs drllm_schedule"),
    ({"drllm_mode": "schedule", "drllm_schedule": [1] * 29}, r"one entry per decoder layer \(30\), got 29"),
    ({"drllm_mode": "schedule", "drllm_schedule": [1] * 29 + [3]}, r"drllm_schedule\[29\] = 3.*0 \(skip\)"),
    ({"drllm_mode": "schedule", "drllm_schedule": "111"}, r"must be a list of 30 ints"),
    ({"drllm_schedule": [1] * 30}, r"only read with drllm_mode = \"schedule\""),
    ({"drllm_bias": 3}, r"drllm_bias = 3 .*\[-1, 1\]"),
    ({"drllm_bias": "high"}, r"drllm_bias = 'high'"),
    ({"drllm_route_tokens": 0}, r"drllm_route_tokens = 0"),
    ({"drllm_route_start": -1}, r"drllm_route_start = -1 .*int >= 0"),
    ({"drllm_route_start": 5, "drllm_route_tokens": 5}, r"drllm_route_start = 5 .*< drllm_route_tokens = 5"),
    ({"drllm_windows": 4}, r"unknown routing control.*drllm_windows"),
]


@pytest.mark.parametrize("extra,message", BAD_CONTROLS)
def test_bad_controls_are_rejected_at_admission(dr_llm, extra, message):
    with pytest.raises(VLLMValidationError, match=message):
        dr_llm.generate(["Hello"], SamplingParams(max_tokens=2, extra_args=extra), use_tqdm=False)
    # the engine is unharmed
    (out,) = dr_llm.generate(["Hello"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 2


def _copy(checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    dst.mkdir()
    for f in checkpoint.iterdir():
        os.link(f, dst / f.name) if f.suffix != ".json" and f.name != "routers.safetensors" \
            else shutil.copy(f, dst / f.name)
    return dst


def _edit_routers(path, fn):
    t = load_file(path / "routers.safetensors")
    fn(t)
    save_file(t, path / "routers.safetensors")


def _edit_config(path, fn):
    c = json.loads((path / "config.json").read_text())
    fn(c)
    (path / "config.json").write_text(json.dumps(c))


BAD_CHECKPOINTS = {
    "wrong router shape": (
        lambda p: _edit_routers(p, lambda t: t.update({"model.routers.3.fc1.weight": torch.zeros(64, 576)})),
        r"model.routers.3.fc1.weight .* shape \(64, 576\), expected \(128, 576\)",
    ),
    "NaN router weights": (
        lambda p: _edit_routers(p, lambda t: t["model.routers.0.fc2.bias"].fill_(float("nan"))),
        r"model.routers.0.fc2.bias .* NaN",
    ),
    "missing router file": (
        lambda p: (p / "routers.safetensors").unlink(),
        r"router file .*routers.safetensors is missing",
    ),
    "unknown drllm key": (
        lambda p: _edit_config(p, lambda c: c["drllm"].update({"windows": 4})),
        r"invalid 'drllm' block.*windows",
    ),
    "repeat layer out of range": (
        lambda p: _edit_config(p, lambda c: c["drllm"].update({"repeat_layers": [30]})),
        r"repeat_layers \[30\] out of range",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoints_fail_before_the_engine_starts(checkpoint, tmp_path, case):
    break_it, message = BAD_CHECKPOINTS[case]
    path = _copy(checkpoint, tmp_path)
    break_it(path)
    with pytest.raises(ValueError, match=message):
        make_llm(path)


@pytest.mark.parametrize(
    "setting", [{"pipeline_parallel_size": 2}, {"enable_lora": True}]
)
def test_conflicting_engine_settings_are_refused(checkpoint, setting):
    with pytest.raises(ValueError, match="cannot run with"):
        make_llm(checkpoint, **setting)


@pytest.mark.parametrize("flag", ["enable_prefix_caching", "enable_chunked_prefill"])
@pytest.mark.parametrize("value", [None, True, False])
def test_prefix_caching_and_chunked_prefill_follow_the_user(checkpoint, flag, value):
    from vllm.engine.arg_utils import EngineArgs

    kwargs = {} if value is None else {flag: value}
    config = EngineArgs(model=str(checkpoint), max_model_len=512, **kwargs).create_engine_config()
    on = (config.cache_config.enable_prefix_caching if flag == "enable_prefix_caching"
          else config.scheduler_config.enable_chunked_prefill)
    assert on is (value is not False)  # vLLM's default (on) unless switched off
