"""Can a router tell, from the question, which layer is safe to skip for it?

Issue 18 asks for routers that beat static pruning. A router sees only the
question's hidden states (pooled over `tasks.route_span`), never the
choices, so per-question routing can only beat a static layer choice if
those states predict which single-layer skip hurts this question's answer.
This measures that directly, with dense labels instead of MCTS paths:

1. `score`: for a seeded random draw of search-split questions (never the
   evaluation parts), every choice's cloze score under the full model and
   with exactly one layer skipped, for each layer in --layers; through the
   engine on the checkpoint that allows every action (`prepare(allow="all")`,
   what `drllm search` uses). Appended per question to a JSONL file
   (resumable: a rerun scores only the questions not in it).
2. `probe`: label (question q, layer l) "skip-safe" when skipping l alone
   lowers the gold choice's margin over the best wrong choice (nats per
   character, `labels.margin`) by at most --tau. Features are the router
   inputs along the full path (`train.compute_features`, teacher-forced,
   window means). Out-of-fold (5 folds, seeded) it fits (a) per layer, an
   L2 logistic regression on the standardised window-averaged input, and
   (b) the routers themselves (`train.StackedRouters`, focal loss, class
   weights, as `drllm train`), and reports per layer the AUC of each for
   the skip-safe label; with no signal AUC is 0.5 (its sd under that null is
   printed). It also compares, on held-out folds, skipping for each
   question the one layer the routers are most sure of against skipping the
   one layer that cost least on the training folds (static), in accuracy
   points vs the full model (paired, one standard error).

    python benchmarks/skip_predictability.py score --tasks arc_easy:570,arc_challenge:299
    python benchmarks/skip_predictability.py probe --tau 0.02

Output: --scores (JSONL, gzip-compressed if named .gz) and --out (.json and .md).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path("benchmarks/results/issue18")


def _open(path: Path, mode: str = "rt"):
    """A scores file, gzip-compressed when its name ends in .gz (appends add a
    gzip member, which readers take as one stream)."""
    return gzip.open(path, mode) if path.suffix == ".gz" else path.open(mode)


def score(args) -> None:
    from drllm_vllm.checkpoint import prepare
    from drllm_vllm.pipeline import tasks
    from drllm_vllm.pipeline.scoring import Scorer, make_engine

    out = Path(args.scores)
    have = set()
    if out.exists():
        with _open(out) as f:
            have = {(r["task"], r["doc_id"], r["format"]) for r in map(json.loads, f)}
    todo = []
    for spec in args.tasks.split(","):
        task, _, n = spec.partition(":")
        todo += [e for e in tasks.load(task, "search", int(n) if n else None, args.format,
                                       args.seed) if (e.task, e.doc_id, e.format) not in have]
    print(f"{len(have)} questions in {out}, {len(todo)} to score", flush=True)
    if not todo:
        return
    scorer = Scorer(make_engine(prepare(args.model, allow="all"), dtype=args.dtype))
    L = scorer.num_layers
    lo, hi = map(int, args.layers.split("-"))
    layers = range(lo, hi + 1)
    if lo < 0 or hi >= L or lo > hi:
        raise ValueError(f"--layers {args.layers!r}: accepted a range within 0-{L - 1}")
    schedules = [[1] * L] + [[0 if i == l else 1 for i in range(L)] for l in layers]
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with _open(out, "at") as f:
        for b in range(0, len(todo), 8):
            part = todo[b: b + 8]
            res = scorer.score([(e, {"drllm_mode": "schedule", "drllm_schedule": s})
                                for e in part for s in schedules])
            for i, e in enumerate(part):
                rs = res[i * len(schedules): (i + 1) * len(schedules)]
                f.write(json.dumps({
                    "task": e.task, "doc_id": e.doc_id, "format": e.format, "gold": e.gold,
                    "full": list(rs[0].scores),
                    "skip": {str(l): list(r.scores) for l, r in zip(layers, rs[1:])}}) + "\n")
            f.flush()
            n = b + len(part)
            print(f"{n}/{len(todo)} questions, {time.perf_counter() - t0:.0f} s", flush=True)


def auc(s: np.ndarray, t: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties half; t in {0, 1}."""
    pos, neg = s[t == 1], s[t == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def logistic_oof(X: torch.Tensor, t: np.ndarray, fold: np.ndarray, lam: float) -> np.ndarray:
    """Out-of-fold logits of an L2 logistic regression (LBFGS), features
    standardised on each training part."""
    out = np.zeros(len(t))
    for k in np.unique(fold):
        tr, te = fold != k, fold == k
        mu, sd = X[tr].mean(0), X[tr].std(0).clamp(min=1e-3)
        Z = (X - mu) / sd
        w = torch.zeros(X.shape[1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        y = torch.tensor(t[tr], dtype=torch.float32)
        opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(Z[tr] @ w + b, y) \
                + lam * (w @ w)
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            out[te] = (Z[te] @ w + b).numpy()
    return out


def routers_oof(x, mask, y: torch.Tensor, fold: np.ndarray, epochs: int) -> np.ndarray:
    """Out-of-fold skip-minus-execute logits [N, L] of routers trained as
    `drllm train` trains them (fixed epochs: no selection on the test fold)."""
    from drllm_vllm.pipeline.train import StackedRouters, class_weights, focal_loss

    N, L = y.shape
    out = np.zeros((N, L))
    for k in np.unique(fold):
        tr = torch.tensor(np.nonzero(fold != k)[0])
        te = torch.tensor(np.nonzero(fold == k)[0])
        torch.manual_seed(int(k))
        m = StackedRouters(L, x.shape[-1], 128, seed=int(k))
        m.set_input_stats(x[tr], mask[tr])
        alpha = class_weights(torch.bincount(y[tr].flatten(), minlength=3), 0.999, 10)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01)
        for _ in range(epochs):
            order = tr[torch.randperm(len(tr))]
            for b in range(0, len(order), 16):
                i = order[b: b + 16]
                loss = focal_loss(m(x[i].float(), mask[i]).reshape(-1, 3), y[i].flatten(), alpha)
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            lg = m(x[te].float(), mask[te])
        out[te.numpy()] = (lg[..., 0] - lg[..., 1]).numpy()
    return out


def probe(args) -> dict:
    from drllm_vllm.checkpoint import cache_dir, prepare
    from drllm_vllm.pipeline.labels import margin
    from drllm_vllm.pipeline.train import compute_features

    with _open(Path(args.scores)) as f:
        rows = [json.loads(line) for line in f]
    if not rows:
        raise ValueError(f"{args.scores} holds no scored questions; run `score` first")
    layers = sorted(int(k) for k in rows[0]["skip"])
    checkpoint = prepare(args.model)
    L = json.loads((Path(checkpoint) / "config.json").read_text())["num_hidden_layers"]
    records = [{"task": r["task"], "doc_id": r["doc_id"], "format": r["format"],
                "shots": 5 if r["format"] == "five-shot" else 0, "best": [1] * L} for r in rows]
    x, mask, _ = compute_features(Path(checkpoint), records,
                                  cache_dir() / "features" / f"{args.model}-full-path.pt")
    m = mask[:, None, :, None].float()
    x_mean = (x.float() * m).sum(2) / m.sum(2)  # [N, L, d]
    N = len(rows)
    fold = np.random.default_rng(args.seed).permutation(N) % 5
    full_m = np.array([margin(r["full"], r["gold"]) for r in rows])
    full_c = np.array([int(np.argmax(r["full"]) == r["gold"]) for r in rows])
    drop = np.zeros((N, L))  # margin change when l alone is skipped (0 where not scored)
    right = np.tile(full_c[:, None], (1, L)).astype(float)
    for i, r in enumerate(rows):
        for l in layers:
            drop[i, l] = margin(r["skip"][str(l)], r["gold"]) - full_m[i]
            right[i, l] = int(np.argmax(r["skip"][str(l)]) == r["gold"])
    safe = drop >= -args.tau
    y = torch.ones(N, L, dtype=torch.long)  # 0 skip (safe), 1 execute; unscored layers execute
    for l in layers:
        y[:, l] = torch.tensor(np.where(safe[:, l], 0, 1))
    router_scores = routers_oof(x, mask, y, fold, args.epochs)
    per_layer = []
    for l in layers:
        t = safe[:, l].astype(int)
        n1, n0 = int(t.sum()), int(N - t.sum())
        per_layer.append({
            "layer": l, "skip_safe_rate": t.mean(),
            "accuracy_change": 100 * (right[:, l] - full_c).mean(),
            "accuracy_change_se": 100 * (right[:, l] - full_c).std(ddof=1) / math.sqrt(N),
            "logistic_auc": auc(logistic_oof(x_mean[:, l], t, fold, args.l2), t),
            "routers_auc": auc(router_scores[:, l], t),
            "null_auc_sd": math.sqrt((N + 1) / (12 * max(n1, 1) * max(n0, 1))),
        })
        p = per_layer[-1]
        print(f"layer {l:2d}: skip-safe {p['skip_safe_rate']:.2f}, accuracy {p['accuracy_change']:+.1f}"
              f" ± {p['accuracy_change_se']:.1f}, AUC logistic {p['logistic_auc']:.3f}, routers "
              f"{p['routers_auc']:.3f} (null sd {p['null_auc_sd']:.3f})", flush=True)
    # one skip per question: the routers' most confident layer vs the best static layer
    routed, static = np.zeros(N), np.zeros(N)
    for k in np.unique(fold):
        tr, te = fold != k, np.nonzero(fold == k)[0]
        best = max(layers, key=lambda l: (right[tr, l].mean(), drop[tr, l].mean()))
        for i in te:
            routed[i] = right[i, max(layers, key=lambda l: router_scores[i, l])]
            static[i] = right[i, best]

    def paired(a, b):
        d = 100 * (a - b)
        return {"mean": d.mean(), "se": d.std(ddof=1) / math.sqrt(len(d))}

    result = {
        "command": "python benchmarks/skip_predictability.py probe " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("func", "cmd")),
        "model": args.model, "questions": N,
        "by_task": {t: sum(r["task"] == t for r in rows) for t in sorted({r["task"] for r in rows})},
        "formats": sorted({r["format"] for r in rows}), "tau": args.tau,
        "full_accuracy": 100 * full_c.mean(), "layers": per_layer,
        "mean_logistic_auc": float(np.mean([p["logistic_auc"] for p in per_layer])),
        "mean_routers_auc": float(np.mean([p["routers_auc"] for p in per_layer])),
        "one_skip_routed_vs_full": paired(routed, full_c),
        "one_skip_static_vs_full": paired(static, full_c),
        "one_skip_routed_vs_static": paired(routed, static),
        "oracle_best_single_skip_accuracy": 100 * float(np.mean(
            [max(right[i, l] for l in layers) for i in range(N)])),
    }
    print(f"{N} questions, full accuracy {result['full_accuracy']:.1f}%: mean AUC logistic "
          f"{result['mean_logistic_auc']:.3f}, routers {result['mean_routers_auc']:.3f}; one skip "
          f"per question, routed {result['one_skip_routed_vs_full']['mean']:+.1f} ± "
          f"{result['one_skip_routed_vs_full']['se']:.1f}, static "
          f"{result['one_skip_static_vs_full']['mean']:+.1f} ± "
          f"{result['one_skip_static_vs_full']['se']:.1f} points vs full")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Single-layer skip: predictable from the question? ({N} questions, "
             f"{', '.join(result['formats'])}, tau {args.tau})", "", f"`{result['command']}`", "",
             "| layer | skip-safe | accuracy vs full (pts) | AUC logistic | AUC routers |",
             "|---|---|---|---|---|"]
    lines += [f"| {p['layer']} | {p['skip_safe_rate']:.2f} | {p['accuracy_change']:+.1f} ± "
              f"{p['accuracy_change_se']:.1f} | {p['logistic_auc']:.3f} | {p['routers_auc']:.3f} |"
              for p in per_layer]
    lines += ["", f"AUC under no signal: 0.5, sd about {per_layer[0]['null_auc_sd']:.3f} per layer. "
              f"Mean AUC: logistic {result['mean_logistic_auc']:.3f}, routers "
              f"{result['mean_routers_auc']:.3f}.", "",
              "One skip per question, held-out folds, accuracy points vs full (± se): routed "
              f"{result['one_skip_routed_vs_full']['mean']:+.1f} ± {result['one_skip_routed_vs_full']['se']:.1f}, "
              f"static {result['one_skip_static_vs_full']['mean']:+.1f} ± {result['one_skip_static_vs_full']['se']:.1f}, "
              f"routed - static {result['one_skip_routed_vs_static']['mean']:+.1f} ± "
              f"{result['one_skip_routed_vs_static']['se']:.1f}. An oracle that picks each "
              f"question's best single skip would score {result['oracle_best_single_skip_accuracy']:.1f}% "
              f"(full {result['full_accuracy']:.1f}%).", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="single-layer skip scores through the engine (resumable)")
    p = sub.add_parser("probe", help="out-of-fold AUC of the skip-safe label from router inputs")
    for a in (s, p):
        a.add_argument("--model", default="smollm2-135m-instruct")
        a.add_argument("--scores", default=str(RESULTS / "single_skip_scores.jsonl.gz"))
        a.add_argument("--seed", type=int, default=0)
    s.add_argument("--tasks", default="arc_easy:570,arc_challenge:299",
                   help="task:count,... (a seeded draw of each search split; no count: all)")
    s.add_argument("--format", default="zero-shot")
    s.add_argument("--layers", default="2-28", help="the layers to skip one at a time, lo-hi")
    s.add_argument("--dtype", default=None)
    s.set_defaults(func=score)
    p.add_argument("--tau", type=float, default=0.02, help="largest margin drop (nats/char) "
                   "that still counts as skip-safe")
    p.add_argument("--l2", type=float, default=0.01, help="logistic regression's L2 weight")
    p.add_argument("--epochs", type=int, default=8, help="router training epochs per fold")
    p.add_argument("--out", default=str(RESULTS / "skip_predictability"))
    p.set_defaults(func=probe)
    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
