"""Which search labels the routers train on: the robustness filter.

A search label is the shortest path that answered right (`search.reward`).
On a model near chance many of those are luck: the full model was wrong by
a hair and the path right by a hair, and a router cannot learn a rule from
that. The filter keeps a label only when its path answers right with room
to spare, and no worse than the full model did (`robust`):

- under the path, the gold choice beats the best wrong choice by at least
  `min_margin` nats per character (the cloze score's unit), and
- the path does not lower that margin versus the full model by more than
  `tolerance`.

Margins need every choice's score under the full model and under the path;
search records keep only the outcome, so `rescore` gets the scores from the
engine (two forced schedules per label) and appends them to SCORES_FILE
beside the search files, keyed by task, doc, format and path (resumable; a
new search record gets its row on the next run). Re-ordering the choices is
no perturbation here: in cloze scoring they are separate continuations, not
listed in the prompt (every format), so the margin is the robustness test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SCORES_FILE = "label_scores.jsonl"  # not search*.jsonl: training does not read it as labels


@dataclass(frozen=True)
class LabelFilter:
    min_margin: float = 0.05  # nats per character, gold over the best wrong choice
    tolerance: float = 0.05  # largest drop of that margin versus the full model


def margin(scores, gold: int) -> float:
    """Gold's per-character score minus the best wrong choice's."""
    return scores[gold] - max(s for i, s in enumerate(scores) if i != gold)


def robust(full_scores, path_scores, gold: int, f: LabelFilter = LabelFilter()) -> bool:
    """Is the label path's right answer robust (module docstring)? Pure."""
    m_path = margin(path_scores, gold)
    return m_path >= f.min_margin and m_path >= margin(full_scores, gold) - f.tolerance


def score_key(r: dict) -> tuple:
    """A labelled record's identity in the scores file."""
    from .search import record_format

    return (r["task"], r["doc_id"], record_format(r), tuple(r["best"]))


def read_scores(path: Path) -> dict[tuple, dict]:
    from .search import read_records

    return {score_key(r): r for r in read_records(path)}


def rescore(scorer, records: list[dict], out: Path, chunk: int = 64, log=print) -> dict:
    """Per labelled record, every choice's per-character score under the full
    model and under its label path, appended to `out` (skipping those there).
    `scorer` must run on a checkpoint that allows every action (the search's)."""
    from tqdm import tqdm

    from . import tasks
    from .search import record_format

    have = read_scores(out)
    todo = [r for r in records if r.get("best") is not None and score_key(r) not in have]
    log(f"rescore: {len(have)} labels already in {out}, {len(todo)} to go")
    examples: dict[tuple[str, str], dict[int, tasks.Example]] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f, tqdm(total=len(todo), desc="rescore", unit="label") as bar:
        for b in range(0, len(todo), chunk):
            part = todo[b: b + chunk]
            items = []
            for r in part:
                k = (r["task"], record_format(r))
                if k not in examples:
                    examples[k] = {e.doc_id: e for e in tasks.load(k[0], "search", format=k[1])}
                e = examples[k][r["doc_id"]]
                items += [(e, {"drllm_mode": "full"}),
                          (e, {"drllm_mode": "schedule", "drllm_schedule": list(r["best"])})]
            scored = scorer.score(items)
            for i, r in enumerate(part):
                full, path = scored[2 * i], scored[2 * i + 1]
                row = {"task": r["task"], "doc_id": r["doc_id"], "format": record_format(r),
                       "best": list(r["best"]), "gold": items[2 * i][0].gold,
                       "full_scores": list(full.scores), "path_scores": list(path.scores),
                       "full_correct": full.correct, "path_correct": path.correct}
                f.write(json.dumps(row) + "\n")
                have[score_key(r)] = row
            f.flush()
            bar.update(len(part))
    return have


def keep(records: list[dict], scores: dict[tuple, dict] | None,
         f: LabelFilter | None) -> tuple[list[dict], dict]:
    """The labelled records the routers train on, and per format how many
    were labelled, kept, improved (full wrong, path right) and improved kept.
    f=None keeps every label. Raises if a label has no scores."""
    from .search import record_format

    labelled = [r for r in records if r.get("best") is not None]
    if f is not None:
        missing = [r for r in labelled if score_key(r) not in (scores or {})]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(labelled)} labels have no scores in {SCORES_FILE} "
                f"(e.g. {missing[0]['task']} doc {missing[0]['doc_id']}, "
                f"{record_format(missing[0])}); run `drllm search --rescore-labels` first, "
                f"or train with --label-filter none")
    kept, counts = [], {}
    for r in labelled:
        ok = f is None or robust(scores[score_key(r)]["full_scores"],
                                 scores[score_key(r)]["path_scores"],
                                 scores[score_key(r)]["gold"], f)
        c = counts.setdefault(record_format(r), {"labelled": 0, "kept": 0,
                                                 "improved": 0, "improved_kept": 0})
        c["labelled"] += 1
        c["kept"] += ok
        c["improved"] += not r["default_correct"]
        c["improved_kept"] += ok and not r["default_correct"]
        if ok:
            kept.append(r)
    return kept, counts


def card_labels(model_dir: Path, card: dict) -> list[dict] | None:
    """The labels a router card says its routers trained on: the records of
    every search file it names (`search.files`, or `search.file` in cards
    written before several files) through its label filter (`labels.filter`,
    with the scores beside them). None when a file it needs is missing."""
    from .search import load_records

    search = card.get("search", {})
    files = [model_dir / n for n in search.get("files") or [search.get("file", "search.jsonl")]]
    spec = (card.get("labels") or {}).get("filter")
    scores_path = model_dir / (card.get("labels") or {}).get("scores_file", SCORES_FILE)
    if not all(p.is_file() for p in files) or (spec and not scores_path.is_file()):
        return None
    records = load_records(files)
    f = LabelFilter(**spec) if spec else None
    return keep(records, read_scores(scores_path) if f else None, f)[0]
