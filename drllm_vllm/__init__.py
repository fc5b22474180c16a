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
