"""`drllm search`: MCTS supervision with paths scored in batches by the engine.

Up to `pool` examples search at once, in lock-step: each round, every active
search names the path it needs next, and all of them are scored in one
engine call as forced schedules (many examples' simulations per call, so the
search runs at serving throughput). A finished example is appended to a
JSONL file at once, so an interrupted run resumes where it stopped.

Reward: the path answers correctly (cloze, per-character normalised) AND
keeps the gold answer's log-probability per character within `tolerance`
of the full model's. Without the second condition the search finds paths
that break the model (e.g. skip the first two layers): a broken model
spreads probability evenly, and per-character normalisation then picks the
longest choice, which in ARC is often the gold one.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

from . import tasks
from .mcts import MCTSConfig, Search

SEARCH_TASKS = tasks.IN_DOMAIN


def search_order(task_names, limit: int | None, seed: int = 0,
                 format: str | None = None) -> list[tasks.Example]:
    """Search examples of the tasks in `format` (None: each task's default),
    each task shuffled with `seed`, interleaved."""
    per_task = []
    for t in task_names:
        ex = tasks.load(t, "search", format=format)
        random.Random(f"{seed}:{t}").shuffle(ex)
        per_task.append(ex)
    order = [e for group in zip_longest_all(per_task) for e in group]
    return order[:limit]


def zip_longest_all(lists):
    for i in range(max(map(len, lists))):
        yield [lst[i] for lst in lists if i < len(lst)]


DEFAULT_TOLERANCE = 0.05  # nats per character


def reward(path_result, default_result, tolerance: float = DEFAULT_TOLERANCE) -> float:
    """1 if the path is right without losing the full model's grip on the gold."""
    ok = path_result.correct and (
        path_result.gold_score >= default_result.gold_score - tolerance)
    return float(ok)


def run_search(scorer, out: Path, task_names=SEARCH_TASKS, limit: int | None = None,
               config: MCTSConfig = MCTSConfig(), pool: int = 32, seed: int = 0,
               tolerance: float = DEFAULT_TOLERANCE, log=print,
               format: str | None = None) -> list[dict]:
    """Search `limit` examples (None: all) of `task_names` in prompt `format`
    (None: each task's default), appending one record per example to `out`
    and skipping those already there (resumable). One file holds one format."""
    from tqdm import tqdm

    L = scorer.llm.llm_engine.model_config.hf_config.num_hidden_layers
    done = {(r["task"], r["doc_id"]) for r in read_records(out)}
    stale = [r for r in read_records(out) if record_format(r) != tasks.format_for(r["task"], format)]
    if stale:
        raise ValueError(f"{out} has {len(stale)} records searched in another prompt "
                         f"format ({record_format(stale[0])!r}, e.g. {stale[0]['task']} doc "
                         f"{stale[0]['doc_id']}; this search: "
                         f"{tasks.format_for(stale[0]['task'], format)!r}); use another --out")
    queue = [e for e in search_order(task_names, limit, seed, format)
             if (e.task, e.doc_id) not in done]
    log(f"search: {len(done)} examples already in {out}, {len(queue)} to go "
        f"(pool {pool}, {config.simulations} simulations each)")
    out.parent.mkdir(parents=True, exist_ok=True)
    active: list[tuple[tasks.Example, Search, dict]] = []
    bar = tqdm(total=len(queue), desc="search", unit="ex")
    paths = 0
    start = time.perf_counter()
    with open(out, "a") as f:
        while queue or active:
            while queue and len(active) < pool:
                e = queue.pop(0)
                active.append((e, Search(L, config, seed=seed), {"forward_passes": 0}))
            batch = []
            for e, s, stats in active:
                p = s.pending()
                if p is not None:
                    batch.append((e, s, stats, p))
            if batch:
                scored = scorer.score([(e, {"drllm_mode": "schedule", "drllm_schedule": list(p)})
                                       for e, _, _, p in batch])
                for (e, s, stats, p), r in zip(batch, scored):
                    default = stats.setdefault("default", r)  # the root is scored first
                    s.report(p, reward(r, default, tolerance))
                    stats["forward_passes"] += len(e.continuations)
                paths += len(batch)
            still = []
            for e, s, stats in active:
                if s.pending() is None:
                    f.write(json.dumps(record(e, s, stats, format)) + "\n")
                    f.flush()
                    bar.update(1)
                else:
                    still.append((e, s, stats))
            active = still
            bar.set_postfix(paths_per_s=f"{paths / (time.perf_counter() - start):.2f}")
    bar.close()
    records = read_records(out)
    log(summary_text(summarise(records, L)))
    return records


def record(e: tasks.Example, s: Search, stats: dict, format: str | None = None) -> dict:
    fmt = tasks.format_for(e.task, format)
    return {"task": e.task, "doc_id": e.doc_id, "format": fmt,
            "shots": 5 if fmt == "five-shot" else 0,
            "default_correct": stats["default"].correct,
            "best": list(s.best) if s.best else None, "simulations": s.simulations,
            "paths": s.paths_evaluated, "forward_passes": stats["forward_passes"]}


def record_format(r: dict) -> str:
    """A search record's prompt format (records written before formats existed
    were searched in their task's default format)."""
    return r.get("format") or tasks.format_for(r["task"])


def search_files(model_dir: Path) -> list[Path]:
    """A model's search label files: every search*.jsonl beside its routers
    (search.jsonl, search_chat.jsonl, ...), sorted by name."""
    return sorted(Path(model_dir).glob("search*.jsonl"))


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_records(paths: list[Path]) -> list[dict]:
    """The records of several search files, each with its prompt format
    ("format", filled in for records written before formats) and its file
    ("file"). One (task, doc, format) in two files is refused: it would be
    trained on twice."""
    out, seen = [], {}
    for p in paths:
        for r in read_records(Path(p)):
            r = {**r, "format": record_format(r), "file": Path(p).name}
            k = (r["task"], r["doc_id"], r["format"])
            if k in seen:
                raise ValueError(f"{r['task']} doc {r['doc_id']} ({r['format']}) is in both "
                                 f"{seen[k]} and {r['file']}; keep one of them")
            seen[k] = r["file"]
            out.append(r)
    return out


def summarise(records: list[dict], num_layers: int) -> dict:
    labelled = [r for r in records if r["best"] is not None]
    hist = Counter(a for r in labelled for a in r["best"])
    improved = [r for r in labelled if not r["default_correct"]]
    return {
        "examples": len(records),
        "by_task": dict(Counter(r["task"] for r in records)),
        "paths": sum(r["paths"] for r in records),
        "forward_passes": sum(r["forward_passes"] for r in records),
        "default_correct": sum(bool(r["default_correct"]) for r in records),
        "with_correct_path": len(labelled),
        "improved": len(improved),
        "mean_layers_saved": (sum(num_layers - sum(r["best"]) for r in labelled)
                              / max(len(labelled), 1)),
        "labels": {"skip": hist[0], "execute": hist[1], "repeat": hist[2]},
    }


def summary_text(s: dict) -> str:
    n = sum(s["labels"].values()) or 1
    return (f"searched {s['examples']} examples {s['by_task']}: {s['paths']} paths, "
            f"{s['forward_passes']} forward passes; default correct {s['default_correct']}, "
            f"with a correct path {s['with_correct_path']}, improved (wrong -> right) "
            f"{s['improved']}; mean layers saved {s['mean_layers_saved']:.2f}; labels "
            + ", ".join(f"{k} {v} ({100 * v / n:.1f}%)" for k, v in s["labels"].items()))


def random_paths(num_layers: int, count: int, rng: random.Random) -> list[tuple[int, ...]]:
    """The default path and random paths a few MCTS actions away from it."""
    from .mcts import children_of

    paths = [(1,) * num_layers]
    while len(paths) < count:
        p = paths[0]
        for _ in range(rng.randint(1, 3)):
            p = rng.choice(children_of(p))
        paths.append(p)
    return paths


def speed_comparison(scorer, checkpoint: Path, n_examples: int, out: Path,
                     paths_per_example: int = 4, log=print) -> dict:
    """Paths/s: the engine scoring all paths in one batch vs the reference
    forward scoring one path (one choice) at a time; same examples, same paths."""
    import torch

    from .evaluate import provenance
    from .reference import Reference

    L = scorer.llm.llm_engine.model_config.hf_config.num_hidden_layers
    rng = random.Random(0)
    items = [(e, p) for e in search_order(SEARCH_TASKS, n_examples)
             for p in random_paths(L, paths_per_example, rng)]
    scorer.score([(items[0][0], {"drllm_mode": "full"})])  # warm-up
    t0 = time.perf_counter()
    engine = scorer.score([(e, {"drllm_mode": "schedule", "drllm_schedule": list(p)})
                           for e, p in items])
    t_engine = time.perf_counter() - t0
    ref = Reference(checkpoint)
    t0 = time.perf_counter()
    agree = 0
    with torch.no_grad():
        for (e, p), r in zip(items, engine):
            ids, _ = scorer.encoded(e)
            lps = []
            for seq, start in zip(ids, scorer.continuation_starts(e)):
                logits, _ = ref.forward(seq, p, all_positions=True)
                logp = torch.log_softmax(logits[:-1].float(), -1)
                lps.append(logp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])][start - 1:].sum().item())
            agree += (tasks.pick(lps, e.continuations) == e.gold) == r.correct
    t_ref = time.perf_counter() - t0
    result = {**provenance(checkpoint), "examples": n_examples, "paths": len(items),
              "engine_paths_per_s": len(items) / t_engine, "engine_seconds": t_engine,
              "reference_paths_per_s": len(items) / t_ref, "reference_seconds": t_ref,
              "speedup": t_ref / t_engine, "reward_agreement": agree / len(items),
              "engine_dtype": str(scorer.llm.llm_engine.model_config.dtype),
              "reference_dtype": "float32"}
    log(f"search speed on {len(items)} paths ({n_examples} examples): engine batched "
        f"{result['engine_paths_per_s']:.2f} paths/s, reference one at a time "
        f"{result['reference_paths_per_s']:.2f} paths/s: {result['speedup']:.1f}x; rewards "
        f"agree on {100 * result['reward_agreement']:.0f}% of paths")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result
