"""Base accuracy (every layer once) of a model per prompt format and task.

Where the base model scores clearly above chance is where routing can show,
so this runs before a search picks its format. Seeded random subsets of the
in-domain evaluation parts (`tasks.load`, the same draw as `drllm eval`),
cloze scoring through the plugin in `drllm_mode="full"`. Prints a table
(accuracy ± binomial standard error, chance) and writes JSON after each
format, so a stopped run keeps what it measured.

    python benchmarks/base_formats.py --model qwen2.5-coder-0.5b-instruct --limit 150
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from drllm_vllm.checkpoint import prepare
from drllm_vllm.pipeline import tasks
from drllm_vllm.pipeline.scoring import Scorer, make_engine


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, default=150, help="examples per task (seeded draw)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--formats", default=",".join(tasks.FORMATS))
    ap.add_argument("--tasks", default=",".join(tasks.IN_DOMAIN))
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--enforce-eager", action="store_true", help="skip compilation (start-up)")
    ap.add_argument("--out", default=None, help="JSON (default benchmarks/results/"
                    "base_formats_<model>.json)")
    args = ap.parse_args(argv)
    out = Path(args.out or f"benchmarks/results/base_formats_{args.model}.json")
    scorer = Scorer(make_engine(prepare(args.model, allow="all"), dtype=args.dtype,
                                enforce_eager=args.enforce_eager))
    report = {"model": args.model, "seed": args.seed, "limit": args.limit,
              "dtype": str(scorer.llm.llm_engine.model_config.dtype), "results": {}}
    for fmt in args.formats.split(","):
        for task in args.tasks.split(","):
            examples = tasks.load(task, "eval", args.limit, fmt, args.seed)
            t0 = time.perf_counter()
            scored = scorer.score([(e, {"drllm_mode": "full"}) for e in examples])
            n, k = len(scored), sum(s.correct for s in scored)
            p = k / n
            row = {"n": n, "correct": k, "accuracy": 100 * p,
                   "se": 100 * math.sqrt(p * (1 - p) / n),
                   "chance": 100 * sum(1 / len(e.continuations) for e in examples) / n,
                   "seconds": round(time.perf_counter() - t0, 1)}
            report["results"].setdefault(fmt, {})[task] = row
            print(f"{fmt:>9} {task:<13} {row['accuracy']:5.1f} ± {row['se']:.1f} "
                  f"(chance {row['chance']:.1f}, n={n}, {row['seconds']:.0f} s)", flush=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n| format | " + " | ".join(args.tasks.split(",")) + " |")
    print("|---|" + "---|" * len(args.tasks.split(",")))
    for fmt, rows in report["results"].items():
        print(f"| {fmt} | " + " | ".join(f"{r['accuracy']:.1f} ± {r['se']:.1f}"
                                         for r in rows.values()) + " |")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
