"""drllm-vllm: Dr.LLM dynamic layer routing as a vLLM plugin.

`register()` is the `vllm.general_plugins` entry point. vLLM calls it in
every process (front end, engine core, workers), so it must be idempotent
and cheap; model classes are registered lazily by their import string.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    from . import hooks
    from .config import ARCHITECTURES

    for arch in ARCHITECTURES:
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"drllm_vllm.model:{arch}")
    hooks.install()
    _registered = True


def schedule_of(output) -> tuple[int, ...] | None:
    """The schedule a finished request ran, from its vLLM RequestOutput.

    The scheduler returns it in `output.kv_transfer_params["drllm"]`, the one
    free-form field that travels from the engine to RequestOutput and to the
    OpenAI responses; `layer_applications` there is its sum.
    """
    report = (getattr(output, "kv_transfer_params", None) or {}).get("drllm")
    return tuple(report["schedule"]) if report else None
