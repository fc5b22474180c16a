"""Score multiple-choice examples through the vLLM engine with Dr.LLM controls.

One example = one request per choice (max_tokens=1, prompt_logprobs=0), all
routed on the question's tokens (`tasks.route_span`: `drllm_route_start` after
any shots or chat-template text, `drllm_route_tokens` no further than the
prefix the choices share), so the choices of a question run under one
schedule, decided by the question alone. Many
examples, each with its own controls (routed, full, a forced schedule, a
bias), go to the engine in one call: this is how search, evaluation and the
benchmarks use it.

Shared prefixes are computed once. vLLM does not read the prefix cache for
a request that asks for prompt log-probs (it cannot return log-probs for
cached positions), so each choice would recompute the few-shot examples and
the question. Where the choices of an example share at least one KV block,
the scorer first sends that shared prefix alone (no log-probs); it is routed
and cached under its schedule (caching.py), and the choices, sent next with
cache reading on, are pinned to the same schedule and compute only their
uncached tails. vLLM leaves the log-probs of cached positions unset
(measured: they hold stale memory), so a choice is used only if its first
scored position is past the cached ones; any other choice (its continuation
shares whole blocks with another choice's) is scored again without the cache.
Measured with SmolLM2: five-shot scoring about 3x faster (ENGINE_DEFAULTS).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import default_dtype
from ..schedule import Schedule, layer_applications
from .tasks import Example, continuation_logprob, encode, per_char, pick, route_span

# block_size 32 (vLLM's CPU default is 128): shared prefixes are cached in
# whole blocks. Plain vs prefix-first scoring of 48 seeded questions (12 each
# of arithmetic, ARC-Easy, HellaSwag, BoolQ), SmolLM2, bf16, 2 cores, with
# 32-token / 128-token blocks: zero-shot full 9.0 -> 6.6 s / 10.2 -> 8.7 s;
# chat routed 15.1 -> 8.9 s / 18.1 -> 13.9 s; five-shot routed 60.6 -> 22.2 s
# / 68.0 -> 18.5 s (same predictions and schedules in all six)
ENGINE_DEFAULTS = dict(max_model_len=2048, max_num_batched_tokens=4096, max_num_seqs=64,
                       block_size=32)
# prompt log-probs hold a few fp32 [step tokens, vocab] tensors at once: a step
# of 4096 tokens over Qwen2.5's 151,936-token vocabulary (2.5 GB each) ran the
# worker out of memory on a 23 GB machine, so a step's logits stay under this
PROMPT_LOGITS_PER_STEP = 1 << 28


def step_tokens(vocab_size: int, most: int = ENGINE_DEFAULTS["max_num_batched_tokens"]) -> int:
    """Tokens per engine step for scoring: the largest power of two (at most
    `most`, at least 512) whose logits fit PROMPT_LOGITS_PER_STEP floats.
    4096 for SmolLM2's 49,152-token vocabulary, 1024 for Qwen2.5's."""
    n = most
    while n > 512 and n * vocab_size > PROMPT_LOGITS_PER_STEP:
        n //= 2
    return n


@dataclass(frozen=True)
class Scored:
    pred: int
    correct: bool
    schedule: Schedule  # the schedule the question ran under
    layer_applications: int
    gold_score: float  # the gold choice's log-probability per character
    scores: tuple[float, ...] = ()  # every choice's log-probability per character

    @classmethod
    def of(cls, e: Example, schedule, pred: int, scores) -> Scored:
        """The result of `e` that predicted `pred` with per-choice `scores`."""
        schedule, scores = tuple(schedule), tuple(scores)
        return cls(pred, pred == e.gold, schedule, layer_applications(schedule),
                   scores[e.gold], scores)


def make_engine(checkpoint: str, dtype: str | None = None, **overrides):
    """An offline vLLM engine on a Dr.LLM checkpoint, sized for scoring."""
    import os

    from vllm import LLM

    # vLLM on CPU otherwise reserves nearly all free RAM for the KV cache (20.6
    # of 23.5 GiB measured), and prompt log-probs over 4096 tokens x 49k vocab
    # then run the worker out of memory. 4 GiB holds ~90k tokens here.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    import json
    from pathlib import Path

    vocab = json.loads((Path(checkpoint) / "config.json").read_text())["vocab_size"]
    sized = {**ENGINE_DEFAULTS, "max_num_batched_tokens": step_tokens(vocab)}
    return LLM(model=str(checkpoint), dtype=dtype or default_dtype(), seed=0,
               **{**sized, **overrides})


class Scorer:
    """Caches tokenisation per example; scores batches of (example, controls)."""

    def __init__(self, llm):
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.max_len = llm.llm_engine.model_config.max_model_len
        self._encoded: dict[tuple[str, int, str], tuple[list[list[int]], int]] = {}
        self._starts: dict[tuple[str, int, str], list[int]] = {}
        self._span: dict[tuple[str, int, str], tuple[int, int]] = {}
        cache = llm.llm_engine.vllm_config.cache_config
        # shared prefixes are sent first when they fill at least one KV block
        self.prefix_block: int | None = cache.block_size if cache.enable_prefix_caching else None
        self.cached_tokens = 0  # prompt tokens read from the prefix cache, all calls
        self.recomputed = 0  # choices scored again because scored positions were cached
        self.num_layers = llm.llm_engine.model_config.hf_config.num_hidden_layers
        # (task, doc id, format, schedule) -> (pred, per-choice scores), all calls
        self.memo: dict[tuple, tuple[int, tuple[float, ...]]] = {}
        self.computed = 0  # questions whose choices went through the engine, all calls

    def encoded(self, e: Example) -> tuple[list[list[int]], int]:
        """Token ids per choice and the length of the prefix they share."""
        key = (e.task, e.doc_id, e.format)
        if key not in self._encoded:
            prompts, shared = encode(self.tokenizer, e)
            longest = max(len(p) for p in prompts)
            if longest > self.max_len:
                raise ValueError(f"{e.task} doc {e.doc_id}: {longest} tokens > "
                                 f"max_model_len {self.max_len}")
            self._encoded[key] = (prompts, shared)
            self._span[key] = route_span(self.tokenizer, e, prompts[0], shared)
            self._starts[key] = [len(p) - len(self.tokenizer.encode(c, add_special_tokens=False))
                                 for p, c in zip(prompts, e.continuations)]
        return self._encoded[key]

    def continuation_starts(self, e: Example) -> list[int]:
        """Per choice, the position of its continuation's first token."""
        self.encoded(e)
        return self._starts[(e.task, e.doc_id, e.format)]

    def route_span(self, e: Example) -> tuple[int, int]:
        """[start, end) of the prompt tokens the routers pool (the question)."""
        self.encoded(e)
        return self._span[(e.task, e.doc_id, e.format)]

    def known(self, e: Example, schedule: Schedule) -> Scored | None:
        """A result for `e` under `schedule` scored before, by any controls."""
        hit = self.memo.get((e.task, e.doc_id, e.format, tuple(schedule)))
        return None if hit is None else Scored.of(e, schedule, *hit)

    def remember(self, e: Example, r: Scored) -> None:
        self.memo[(e.task, e.doc_id, e.format, tuple(r.schedule))] = (r.pred, tuple(r.scores))

    def _fixed_schedule(self, controls: dict) -> Schedule | None:
        """The schedule `controls` force, when they say so explicitly."""
        mode = controls.get("drllm_mode")
        if mode == "full":
            return (1,) * self.num_layers
        if mode == "schedule":
            return tuple(controls["drllm_schedule"])
        return None

    def score(self, items: list[tuple[Example, dict]]) -> list[Scored]:
        """items: (example, drllm controls such as {"drllm_mode": "full"}).

        A question whose schedule is known (forced, or fixed by its routed
        prefix) and was scored under that schedule before (`known`) is not
        scored again: a schedule fixes the computation."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from .. import schedule_of

        def params(controls: dict, e: Example, **kw) -> SamplingParams:
            start, end = self.route_span(e)
            route = {"drllm_route_tokens": end, **({"drllm_route_start": start} if start else {})}
            return SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                  extra_args={**controls, **route}, **kw)

        def run(requests: list[tuple[list[int], SamplingParams]]) -> list:
            if not requests:
                return []
            return self.llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in requests],
                                     [sp for _, sp in requests], use_tqdm=False)

        def prefix(e: Example) -> list[int]:  # the tokens every choice of e shares
            ids, shared = self.encoded(e)
            return ids[0][:shared]

        block = self.prefix_block
        fixed = [self._fixed_schedule(c) for _, c in items]
        results: list[Scored | None] = [
            self.known(e, f) if f is not None else None for (e, _), f in zip(items, fixed)]
        cached = [r is None and block is not None and self.encoded(e)[1] >= block
                  for (e, _), r in zip(items, results)]
        # wave 1, the shared prefixes: routed ones to learn their schedules, the
        # rest to fill the cache (only where a whole block is shared)
        first = [k for k, (r, f) in enumerate(zip(results, fixed))
                 if r is None and (f is None or cached[k])]
        outs = run([(prefix(items[k][0]), params(items[k][1], items[k][0])) for k in first])
        for k, out in zip(first, outs):
            if fixed[k] is None:
                fixed[k] = schedule_of(out)
                results[k] = self.known(items[k][0], fixed[k])
        # wave 2: the choices of every question not known
        requests, owner = [], []
        for k, (e, controls) in enumerate(items):
            if results[k] is not None:
                continue
            sp = params(controls, e, prompt_logprobs=0, skip_reading_prefix_cache=not cached[k])
            for choice, p in enumerate(self.encoded(e)[0]):
                requests.append((p, sp))
                owner.append((k, choice))
        outs = run(requests)
        self.computed += len({k for k, _ in owner})
        again = [i for i, (out, (k, choice)) in enumerate(zip(outs, owner))
                 if (out.num_cached_tokens or 0) >= self.continuation_starts(items[k][0])[choice]]
        if again:  # scored positions fell in cached blocks: recompute those choices
            redo = [(requests[i][0], params(items[owner[i][0]][1], items[owner[i][0]][0],
                                            prompt_logprobs=0, skip_reading_prefix_cache=True))
                    for i in again]
            for i, out in zip(again, run(redo)):
                outs[i] = out
            self.recomputed += len(again)
        self.cached_tokens += sum(out.num_cached_tokens or 0 for out in outs)
        logprobs: dict[int, list[float]] = {}
        schedules: dict[int, set] = {}
        for (k, choice), out in zip(owner, outs):
            e = items[k][0]
            start = self.continuation_starts(e)[choice]
            logprobs.setdefault(k, []).append(continuation_logprob(
                out.prompt_logprobs, self.encoded(e)[0][choice], start))
            schedules.setdefault(k, set()).add(schedule_of(out))
        for k, lp in logprobs.items():
            e = items[k][0]
            if schedules[k] != {fixed[k]}:  # all choices share the prefix's schedule
                raise RuntimeError(f"{e.task} doc {e.doc_id}: choices ran under "
                                   f"{schedules[k]}, their prefix under {fixed[k]}")
            results[k] = Scored.of(e, fixed[k], pick(lp, e.continuations),
                                   per_char(lp, e.continuations))
            self.remember(e, results[k])
        return results
