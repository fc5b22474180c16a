"""The `drllm` block of a checkpoint's config.json, and per-request controls.

Both are validated here and nowhere else; every error names the bad value
and what would be accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .schedule import Schedule, check_schedule

ARCHITECTURES = {
    "DrLlamaForCausalLM": "LlamaForCausalLM",
    "DrQwen2ForCausalLM": "Qwen2ForCausalLM",
    "DrQwen3ForCausalLM": "Qwen3ForCausalLM",
}
MODES = ("routed", "full", "schedule")
CONTROL_KEYS = (
    "drllm_mode", "drllm_schedule", "drllm_bias", "drllm_route_tokens", "drllm_route_start",
)


class DrConfig(BaseModel):
    """What a Dr.LLM checkpoint adds to its base model's config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_windows: int = Field(8, ge=1, description="windows for mean pooling (W)")
    bottleneck: int = Field(128, ge=1, description="router MLP hidden width")
    skip_layers: tuple[int, ...] | None = Field(
        None,
        description="layers the routers may skip; None (a checkpoint written "
        "before skip_layers existed): every layer may skip",
    )
    repeat_layers: tuple[int, ...] = Field(
        (), description="layers that may repeat; each gets a second KV cache"
    )
    default_mode: Literal["routed", "full"] = "routed"
    default_bias: float = Field(0.0, ge=-1.0, le=1.0)
    router_file: str = "routers.safetensors"
    trained: bool = False
    router_card: dict[str, Any] = Field(default_factory=dict)

    @field_validator("skip_layers", "repeat_layers")
    @classmethod
    def _sorted_unique(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is None:
            return None
        if any(i < 0 for i in v):
            raise ValueError(f"layer indices must be >= 0, got {list(v)}")
        return tuple(sorted(set(v)))

    def may_skip(self, layer: int) -> bool:
        """Whether the routers (and the bias knob) may skip `layer`."""
        return self.skip_layers is None or layer in self.skip_layers

    def may_repeat(self, layer: int) -> bool:
        """Whether `layer` may repeat (it has a virtual repeat attention layer)."""
        return layer in self.repeat_layers

    def has_choice(self, layer: int) -> bool:
        """Whether the router of `layer` has anything to decide: False when the
        layer may neither skip nor repeat, so that it executes whatever the
        router's logits and the bias (`router.decide`); the serving path then
        does not run that router at all."""
        return self.may_skip(layer) or self.may_repeat(layer)


def parse_drllm_block(hf_config: Any) -> DrConfig:
    """Read and validate `hf_config.drllm`; raise ValueError with one clear line."""
    block = getattr(hf_config, "drllm", None)
    if block is None:
        raise ValueError(
            "this checkpoint has no 'drllm' block in config.json; "
            "build one with `drllm prepare`"
        )
    try:
        cfg = DrConfig.model_validate(block)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'drllm'}: {err['msg']} "
            f"(got {err.get('input')!r})"
            for err in e.errors()
        )
        raise ValueError(f"invalid 'drllm' block in config.json: {problems}") from None
    num_layers = hf_config.num_hidden_layers
    for name in ("skip_layers", "repeat_layers"):
        bad = [i for i in getattr(cfg, name) or () if i >= num_layers]
        if bad:
            raise ValueError(
                f"invalid 'drllm' block: {name} {bad} out of range for "
                f"{num_layers} layers (accepted: 0..{num_layers - 1})"
            )
    return cfg


@dataclass(frozen=True)
class Controls:
    """One request's routing controls, from SamplingParams.extra_args."""

    mode: str = "routed"
    schedule: Schedule | None = None
    bias: float = 0.0
    route_tokens: int | None = None
    route_start: int = 0


def parse_controls(
    extra_args: dict[str, Any] | None, num_layers: int, cfg: DrConfig
) -> Controls:
    """Validate a request's drllm_* extra args; raise ValueError on bad input."""
    args = extra_args or {}
    unknown = [k for k in args if k.startswith("drllm_") and k not in CONTROL_KEYS]
    if unknown:
        raise ValueError(
            f"unknown routing control(s) {unknown}; accepted: {list(CONTROL_KEYS)}"
        )
    mode = args.get("drllm_mode", cfg.default_mode)
    if mode not in MODES:
        raise ValueError(f"drllm_mode = {mode!r} is not accepted; use one of {MODES}")
    schedule = None
    if mode == "schedule":
        if "drllm_schedule" not in args:
            raise ValueError(
                f'drllm_mode = "schedule" needs drllm_schedule: a list of '
                f"{num_layers} ints in {{0, 1, 2}}"
            )
        schedule = check_schedule(args["drllm_schedule"], num_layers, cfg.repeat_layers)
    elif "drllm_schedule" in args:
        raise ValueError(
            f'drllm_schedule is only read with drllm_mode = "schedule", '
            f"got drllm_mode = {mode!r}"
        )
    bias = args.get("drllm_bias", cfg.default_bias)
    if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not (
        math.isfinite(bias) and -1.0 <= bias <= 1.0
    ):
        raise ValueError(
            f"drllm_bias = {bias!r} is not accepted; use a number in [-1, 1] "
            f"(negative: skip more, at layers that may skip; positive: repeat more "
            f"at layers that may repeat, skip less elsewhere; 0: routers as trained)"
        )
    route_tokens = args.get("drllm_route_tokens")
    if route_tokens is not None and (
        isinstance(route_tokens, bool)
        or not isinstance(route_tokens, int)
        or route_tokens < 1
    ):
        raise ValueError(
            f"drllm_route_tokens = {route_tokens!r} is not accepted; use an int >= 1 "
            f"(route on the first N prompt tokens)"
        )
    route_start = args.get("drllm_route_start", 0)
    if isinstance(route_start, bool) or not isinstance(route_start, int) or route_start < 0 or (
        route_tokens is not None and route_start >= route_tokens
    ):
        within = f" and < drllm_route_tokens = {route_tokens}" if route_tokens else ""
        raise ValueError(
            f"drllm_route_start = {route_start!r} is not accepted; use an int >= 0{within} "
            f"(routers pool prompt tokens from this position on)"
        )
    return Controls(mode, schedule, float(bias), route_tokens, route_start)


# CPU feature flags (/proc/cpuinfo) that mean bf16 matmuls run natively
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def default_dtype(cpuinfo: str | None = None) -> str:
    """bfloat16 where the CPU computes it natively (or on a GPU), else float32.

    Without those flags a bf16 matmul is emulated: on an AVX2-only EPYC a
    64x576 @ 576x1536 linear took 12.3 ms in bf16 against 1.5 ms in fp32, and
    vLLM warns that oneDNN falls back to torch's linear.
    """
    import torch

    if torch.cuda.is_available():
        return "bfloat16"
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return "float32"
    flags = {w for line in cpuinfo.splitlines()
             if line.split(":")[0].strip() in ("flags", "Features") for w in line.split()}
    return "bfloat16" if flags & NATIVE_BF16_FLAGS else "float32"
