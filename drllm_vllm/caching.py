"""Exact prefix caching and chunked prefill under per-request schedules.

A KV block holds, for every layer, keys and values that depend on every
decision taken up to that layer, so one block is reusable only by requests
that run the same schedule. vLLM keys cached blocks by a chain of hashes
whose first link includes the request's `cache_salt`; the scheduler
(hooks.DrScheduler) sets each request's salt from what fixes its schedule:

- `full` and forced `schedule` requests: the schedule itself, known at
  admission (a forced all-execute schedule shares blocks with `full`);
- a routed request whose routing inputs (the prompt up to the end of the
  routing window, the window's start, the bias) were routed before in this
  engine: it is pinned to that schedule and salted by it. The routers of one
  engine are fixed, so those inputs determine the schedule;
- any other routed request: a salt of its own, and it reads nothing from the
  cache (its routers need the window's hidden states). Once its routers have
  decided, the scheduler files the blocks it has cached under its
  schedule's salt, and the rest of its blocks are hashed that way too. So
  routed, pinned and forced requests under one schedule all share blocks,
  and a block is never shared across schedules, even if two requests with
  the same routing inputs decided differently in the last bits of floating
  point.

A user's own `cache_salt` is kept: ours is appended to it.

Chunked prefill: a routed request's routing window must be computed in one
step, so its first chunk covers the window or it waits. A window longer
than the step's token budget (max_num_batched_tokens, or a positive
long_prefill_token_threshold) is clamped to the budget: the routers then
pool the first `budget` prompt tokens (`route_end`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

SALT_PREFIX = "drllm:"


def route_end(num_prompt: int, route_tokens: int | None, token_budget: int | None) -> int:
    """End (exclusive) of the prompt positions a routed request pools: the
    first `route_tokens` (whole prompt if None), at most `token_budget`
    (None: no limit), at least 1."""
    end = min(route_tokens or num_prompt, num_prompt)
    if token_budget is not None:
        end = min(end, token_budget)
    return max(end, 1)


def step_token_budget(max_num_batched_tokens: int, long_prefill_token_threshold: int,
                      chunked_prefill: bool) -> int | None:
    """The most prompt tokens one request can get in one step when chunking
    (None when chunked prefill is off: a whole prompt is one step)."""
    if not chunked_prefill:
        return None
    if long_prefill_token_threshold > 0:
        return min(max_num_batched_tokens, long_prefill_token_threshold)
    return max_num_batched_tokens


def _digest(obj) -> str:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:32]


def schedule_salt(schedule: Sequence[int]) -> str:
    """Salt of a request whose schedule is known at admission."""
    return f"{SALT_PREFIX}s:{_digest(list(schedule))}"


def routing_key(prompt: Sequence[int], end: int, start: int, bias: float) -> str:
    """What determines a routed request's schedule, as a salt: the prompt's
    first `end` tokens, the window start, the bias (float, exact repr)."""
    return f"{SALT_PREFIX}r:{_digest([list(prompt[:end]), start, repr(float(bias))])}"


def private_salt(key: str, request_id: str) -> str:
    """A salt no other request shares (for duplicates of a key still routing)."""
    return f"{key}:{_digest(request_id)}"


def combine_salt(user_salt: str | None, ours: str) -> str:
    """The user's own salt, if any, followed by ours: requests that differ in
    either never share a block."""
    return f"{user_salt}|{ours}" if user_salt else ours


KV_CACHE_TOKENS = 131072  # what a CPU engine's KV cache is sized for by default
KV_CACHE_SHARE = 0.4  # at most this share of the memory available at start


def default_kv_cache_bytes(config: dict, dtype_bytes: int, max_model_len: int,
                           available_bytes: int) -> tuple[int, int]:
    """KV-cache size for a Dr.LLM engine on CPU when the user chose none: (bytes, tokens).

    vLLM on CPU otherwise reserves 92% of the machine's memory
    (`--gpu-memory-utilization` 0.92 of the total) and refuses to start when
    that much is not free. This asks for room for KV_CACHE_TOKENS tokens
    (at least four sequences of `max_model_len`), capped at KV_CACHE_SHARE of
    `available_bytes`, and never less than one sequence of `max_model_len`.
    Per token: 2 (K and V) x KV layers (decoder layers + the checkpoint's
    repeat layers, each with its own cache) x KV heads x head size x
    `dtype_bytes`. Config: a Dr.LLM checkpoint's config.json as a dict."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    layers = config["num_hidden_layers"] + len((config.get("drllm") or {}).get("repeat_layers") or ())
    per_token = 2 * layers * config.get("num_key_value_heads", heads) * head_dim * dtype_bytes
    tokens = max(KV_CACHE_TOKENS, 4 * max_model_len)
    tokens = min(tokens, int(KV_CACHE_SHARE * available_bytes) // per_token)
    tokens = max(tokens, max_model_len)
    return tokens * per_token, tokens
