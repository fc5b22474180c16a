"""`drllm eval`: base vs routed vs static pruning, through the vLLM plugin.

Every method scores the same seeded random subsets of the evaluation parts
(`tasks.load`, MMLU stratified by subject) in one prompt format (zero-shot,
five-shot, chat, or each task's default) with the cloze scoring of tasks.py:
- base: `drllm_mode="full"`, every layer once;
- routed: the checkpoint's routers at several `drllm_bias` values (or the
  sweep -1 to 1 in steps of 0.1);
- static pruning at the depth a routed setting reached: the k layers with
  the lowest block influence (1 - mean cosine between a layer's input and
  output, measured on search prompts) are skipped for every request, as a
  forced schedule through the same engine.
Every row reports accuracy, its paired difference from base on the same
examples with a standard error (per task and per group) and mean executed
layer applications per example; writes JSON, a Markdown table, the Pareto
plot and the per-layer decision heat map. The chat check (generation on
chat questions with known answers) is `chat_check.py`.

Every scored example is appended to a score log beside the results
(`<out>.scores.jsonl.gz`, `ScoreLog`) as it is scored, and a run with the
same --out takes what the log already holds for the same routers, dtype,
format and controls, so that a full-size evaluation outlives one session:
commit the log, run the same command again.
"""

from __future__ import annotations

import gzip
import json
import platform
import zlib
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import tasks

DEFAULT_BIASES = (-0.6, -0.3, 0.0, 0.3)
SWEEP = tuple(round(-1 + 0.1 * i, 1) for i in range(21))  # -1.0, -0.9, ..., 1.0


def parse_biases(text: str) -> list[float]:
    """"sweep" (-1 to 1 in steps of 0.1) or comma-separated numbers in [-1, 1]."""
    if text.strip() == "sweep":
        return list(SWEEP)
    try:
        biases = [float(b) for b in text.split(",")]
    except ValueError:
        biases = []
    if not biases or any(not -1 <= b <= 1 for b in biases):
        raise ValueError(f"--biases {text!r} is not accepted; use 'sweep' or comma-separated "
                         f"numbers in [-1, 1], e.g. -0.3,0,0.3")
    return biases


@torch.no_grad()
def block_influence(checkpoint: Path, examples: list[tasks.Example]) -> list[float]:
    """Per layer, 1 - mean cosine(input, output) over the tokens of the prompts."""
    from transformers import AutoTokenizer

    from .reference import Reference

    ref = Reference(checkpoint)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    layers = ref.model.model.layers
    sums = [0.0] * len(layers)
    count = 0
    captured: dict[int, torch.Tensor] = {}

    def hook(i):
        def f(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            captured[i] = torch.nn.functional.cosine_similarity(x[0].float(), y[0].float(), dim=-1)
        return f

    handles = [l.register_forward_hook(hook(i), with_kwargs=True) for i, l in enumerate(layers)]
    try:
        for e in examples:
            ids, shared = tasks.encode(tok, e)
            ref.model(torch.tensor([ids[0][:shared]]))
            for i in range(len(layers)):
                sums[i] += captured[i].sum().item()
            count += shared
    finally:
        for h in handles:
            h.remove()
    return [1 - s / count for s in sums]


def static_schedule(influence: list[float], k: int) -> list[int]:
    """Skip the k layers with the lowest block influence, execute the rest."""
    drop = set(sorted(range(len(influence)), key=influence.__getitem__)[:k])
    return [0 if i in drop else 1 for i in range(len(influence))]


def summarise(results, examples) -> dict:
    """Accuracy (%) and mean layer applications per example, per task and overall."""
    by_task: dict[str, list] = {}
    for e, r in zip(examples, results):
        by_task.setdefault(e.task, []).append(r)
    row = {t: {"accuracy": 100 * sum(r.correct for r in rs) / len(rs),
               "layers": sum(r.layer_applications for r in rs) / len(rs), "n": len(rs)}
           for t, rs in by_task.items()}
    for group, names in (("in_domain", tasks.IN_DOMAIN), ("out_of_domain", tasks.OUT_OF_DOMAIN)):
        present = [row[t] for t in names if t in row]
        if present:  # macro average over tasks
            row[group] = {"accuracy": sum(p["accuracy"] for p in present) / len(present),
                          "layers": sum(p["layers"] for p in present) / len(present),
                          "n": sum(p["n"] for p in present)}
    return row


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample variance / n; 0 for n = 1)."""
    m = sum(values) / len(values)
    return m, (sum((x - m) ** 2 for x in values) / max(len(values) - 1, 1) / len(values)) ** 0.5


def paired_delta(base: list[bool], other: list[bool], task_of: list[str]) -> dict:
    """(other - base) accuracy in points with its standard error from the
    per-example paired differences (the same examples ran under both methods,
    so example difficulty cancels): per task, and per group ("in_domain",
    "out_of_domain") the macro mean over its tasks. {name: {"delta", "se"}}."""
    by_task: dict[str, list[int]] = {}
    for b, o, t in zip(base, other, task_of):
        by_task.setdefault(t, []).append(int(o) - int(b))
    out = {}
    for group, names in (("in_domain", tasks.IN_DOMAIN), ("out_of_domain", tasks.OUT_OF_DOMAIN)):
        ds = [by_task[t] for t in names if t in by_task]
        if not ds:
            continue
        means, ses = zip(*map(mean_se, ds))
        var = [se ** 2 for se in ses]  # of each task's mean difference
        for t, m, v in zip([t for t in names if t in by_task], means, var):
            out[t] = {"delta": 100 * m, "se": 100 * v ** 0.5}
        out[group] = {"delta": 100 * sum(means) / len(ds),
                      "se": 100 * sum(var) ** 0.5 / len(ds)}
    return out


def decision_counts(results, num_layers: int) -> list[list[int]]:
    """[L][3] how often each layer was skipped / executed / repeated."""
    counts = [[0, 0, 0] for _ in range(num_layers)]
    for r in results:
        for i, a in enumerate(r.schedule):
            counts[i][a] += 1
    return counts


class ScoreLog:
    """Per-example scores of `drllm eval`, appended as they are made.

    A gzip file of JSON lines (one gzip member per append, ~30 bytes per
    example compressed), one line per (example, controls): task, doc id,
    format, predicted choice, per-character choice scores, the schedule as
    a string of digits. A line is used only by a run whose `identity`
    (routers sha256, dtype, model) equals the line's. A log cut off mid-
    append (the process killed) keeps every complete member: loading stops
    at the damage, and the file is rewritten from what was read before the
    next append.
    """

    def __init__(self, path: Path, identity: dict):
        self.path, self.identity = Path(path), identity
        self.id = json.dumps(identity, sort_keys=True)
        self.rows: dict[tuple, dict] = {}
        self._damaged = False
        self._others: list[str] = []  # lines of other identities, kept as they are
        if not self.path.exists():
            return
        lines = []
        try:
            with gzip.open(self.path, "rt") as f:
                for line in f:
                    lines.append(line)
        except (EOFError, OSError, zlib.error):  # a member cut off mid-write
            self._damaged = True
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                self._damaged = True
                continue
            if row.get("id") == self.id:
                self.rows[self._key(row["controls"], row["task"], row["doc_id"],
                                    row["format"])] = row
            else:
                self._others.append(line if line.endswith("\n") else line + "\n")

    def memo(self) -> dict[tuple, tuple[int, tuple[float, ...]]]:
        """Every logged result as `Scorer.memo` entries: (task, doc id, format,
        schedule) -> (pred, scores); a schedule fixes the result, whatever
        the controls that led to it."""
        return {(r["task"], r["doc_id"], r["format"], tuple(int(c) for c in r["schedule"])):
                (r["pred"], tuple(r["scores"])) for r in self.rows.values()}

    @staticmethod
    def _key(controls: dict | str, task: str, doc_id: int, format: str) -> tuple:
        c = controls if isinstance(controls, str) else json.dumps(controls, sort_keys=True)
        return c, task, doc_id, format

    def get(self, controls: dict, e: tasks.Example):
        """The logged result of `e` under `controls`, or None."""
        from .scoring import Scored

        row = self.rows.get(self._key(controls, e.task, e.doc_id, e.format))
        if row is None:
            return None
        return Scored.of(e, map(int, row["schedule"]), row["pred"], row["scores"])

    def add(self, controls: dict, examples, results) -> None:
        """Append the results of `examples` under `controls` (one gzip member)."""
        c = json.dumps(controls, sort_keys=True)
        new = []
        for e, r in zip(examples, results):
            row = {"id": self.id, "controls": c, "task": e.task, "doc_id": e.doc_id,
                   "format": e.format, "pred": r.pred, "scores": [round(x, 6) for x in r.scores],
                   "schedule": "".join(map(str, r.schedule))}
            self.rows[self._key(c, e.task, e.doc_id, e.format)] = row
            new.append(json.dumps(row, separators=(",", ":")) + "\n")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._damaged:  # rewrite what was readable, then append as usual
            body = self._others + [json.dumps(r, separators=(",", ":")) + "\n"
                                   for r in self.rows.values()]
            with gzip.open(self.path, "wt") as f:
                f.writelines(body)
            self._damaged = False
            return
        with gzip.open(self.path, "at") as f:
            f.writelines(new)


def run_eval(scorer, checkpoint: Path, limit_in: int | None, limit_out: int | None,
             biases=DEFAULT_BIASES, format: str | None = None, seed: int = 0,
             influence_prompts: int = 64, static: bool = True, log=print,
             score_log: ScoreLog | None = None) -> dict:
    """Score base, routed at each bias and static pruning at the routed depths
    on `limit_in` / `limit_out` examples per in-domain / out-of-domain task
    (seeded random subsets; None: all) in `format` (None: each task's default).
    static=False leaves out the static pruning rows (to compare routers).
    score_log: results already logged are taken from it, new ones appended.
    Returns the report: per method its controls, seconds, per-task
    accuracy (%) and layers, and paired differences vs base (points, se)."""
    L = scorer.llm.llm_engine.model_config.hf_config.num_hidden_layers
    examples = [e for t in tasks.IN_DOMAIN for e in tasks.load(t, "eval", limit_in, format, seed)]
    examples += [e for t in tasks.OUT_OF_DOMAIN
                 for e in tasks.load(t, "eval", limit_out, format, seed)]
    formats = {t: tasks.format_for(t, format) for t in tasks.SPLITS}
    log(f"eval: {len(examples)} examples (seed {seed}; {limit_in} per in-domain task, "
        f"{limit_out} per out-of-domain task), formats {formats}, "
        f"{sum(len(e.continuations) for e in examples)} requests per method")
    methods: dict[str, dict] = {}
    heat = None
    if score_log:
        scorer.memo.update(score_log.memo())
    task_of = [e.task for e in examples]
    base_correct: list[bool] = []

    def run(name: str, controls: dict) -> list:
        t0, computed_before = time.perf_counter(), scorer.computed
        res = [score_log.get(controls, e) if score_log else None for e in examples]
        todo = [i for i, r in enumerate(res) if r is None]
        if len(todo) < len(examples):
            log(f"  {name}: {len(examples) - len(todo)} examples from {score_log.path}")
        for b in range(0, len(todo), 256):  # chunks keep the progress visible
            chunk = [examples[i] for i in todo[b: b + 256]]
            scored = scorer.score([(e, controls) for e in chunk])
            for i, r in zip(todo[b: b + 256], scored):
                res[i] = r
            if score_log:
                score_log.add(controls, chunk, scored)
            log(f"  {name}: {len(examples) - len(todo) + b + len(chunk)}/{len(examples)} examples")
        computed = scorer.computed - computed_before
        correct = [r.correct for r in res]
        if not base_correct:  # the first method run is the base
            base_correct.extend(correct)
        methods[name] = {"controls": controls, "seconds": time.perf_counter() - t0,
                         # run through the engine; the rest were known (score log, or
                         # another method that ran the same schedule: Scorer.known)
                         "computed": computed,
                         "tasks": summarise(res, examples),
                         "vs_base": paired_delta(base_correct, correct, task_of)}
        s, d = methods[name]["tasks"], methods[name]["vs_base"]
        log(f"{name}: " + ", ".join(
            f"{g.replace('_', '-')} {s[g]['accuracy']:.1f}% ({d[g]['delta']:+.1f} ± "
            f"{d[g]['se']:.1f} vs base) at {s[g]['layers']:.2f} layers"
            for g in ("in_domain", "out_of_domain") if g in s)
            + f" ({methods[name]['seconds']:.0f} s; {computed} of {len(examples)} "
            "questions computed, the rest known)")
        return res

    run("base", {"drllm_mode": "full"})
    for p in biases:
        res = run(f"routed bias {p:+.2f}", {"drllm_mode": "routed", "drllm_bias": p})
        if p == 0.0:
            heat = decision_counts(res, L)
    if not static:
        return {"methods": methods, "block_influence": None, "heatmap_bias0": heat,
                "num_layers": L, "formats": formats, "seed": seed,
                "limits": {"in_domain": limit_in, "out_of_domain": limit_out}}
    search_examples = [e for t in tasks.IN_DOMAIN for e in tasks.load(
        t, "search", influence_prompts // len(tasks.IN_DOMAIN), seed=seed)]
    influence = block_influence(checkpoint, search_examples)
    ks = sorted({round(L - m["tasks"]["in_domain"]["layers"]) for n, m in methods.items()
                 if n.startswith("routed")})
    for k in [k for k in ks if 0 < k < L]:
        run(f"static skip {k}", {"drllm_mode": "schedule",
                                 "drllm_schedule": static_schedule(influence, k)})
    return {"methods": methods, "block_influence": influence, "heatmap_bias0": heat,
            "num_layers": L, "formats": formats, "seed": seed,
            "limits": {"in_domain": limit_in, "out_of_domain": limit_out}}


@torch.no_grad()
def generation_baseline(llm, limit: int, max_tokens: int = 256, seed: int = 0) -> dict:
    """Base accuracy on GSM8K and MATH-500 (free-form, a seeded random subset of
    `limit` that fit the context), to show why they are not used."""
    from vllm import SamplingParams

    out = {}
    for name in tasks.GENERATION:
        tok = llm.get_tokenizer()
        room = llm.llm_engine.model_config.max_model_len - max_tokens
        items = [(c, g) for c, g in tasks.generation_examples(name, 4 * limit, seed)
                 if len(tok.encode(c)) <= room][:limit]
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0,
                            stop=["\n\nQuestion:", "\n\nProblem:", "Problem:"],
                            extra_args={"drllm_mode": "full"})
        gens = llm.generate([c for c, _ in items], sp, use_tqdm=False)
        correct = 0
        for (_, gold), g in zip(items, gens):
            ans = tasks.generated_answer(name, g.outputs[0].text)
            correct += ans is not None and tasks.normalise_answer(ans) == tasks.normalise_answer(gold)
        out[name] = {"n": len(items), "accuracy": 100 * correct / len(items)}
    return out


def table(report: dict) -> str:
    """Markdown: per method, accuracy per task and group, each group's paired
    difference vs base (± se) and mean layer applications; then every task's
    paired difference vs base."""
    groups = (("in_domain", tasks.IN_DOMAIN), ("out_of_domain", tasks.OUT_OF_DOMAIN))
    head = []
    for g, names in groups:
        head += list(names) + [g, f"{g} vs base", f"layers ({g})"]
    lines = ["| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for m, r in report["methods"].items():
        t, d = r["tasks"], r.get("vs_base", {})
        cells = []
        for g, names in groups:
            cells += [f"{t[n]['accuracy']:.1f}" if n in t else "-" for n in list(names) + [g]]
            cells.append(f"{d[g]['delta']:+.1f} ± {d[g]['se']:.1f}" if g in d else "-")
            cells.append(f"{t[g]['layers']:.2f}" if g in t else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    names = [n for g, ns in groups for n in ns]
    lines += ["", "Paired difference vs base per task (accuracy points ± one standard error):",
              "", "| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for m, r in report["methods"].items():
        d = r.get("vs_base", {})
        lines.append(f"| {m} | " + " | ".join(
            f"{d[n]['delta']:+.1f} ± {d[n]['se']:.1f}" if n in d else "-" for n in names) + " |")
    return "\n".join(lines + ["", "`vs base`: paired difference in accuracy points on the "
                               "same examples, ± one standard error; layers: mean layer "
                               "applications per example (of "
                               f"{report.get('num_layers', '?')})."])


def _beside(stem: Path, ending: str) -> Path:
    """stem + ending; a stem may hold dots (eval_qwen2.5-coder-0.5b-instruct),
    so never Path.with_suffix, which would cut it at the last one."""
    return stem.with_name(stem.name + ending)


def plots(report: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for prefix, style, label in (("routed", "o-", "routed (bias knob)"),
                                 ("static", "s--", "static pruning (block influence)"),
                                 ("base", "k*", "base (all layers)")):
        pts = sorted((m["tasks"]["in_domain"]["layers"], m["tasks"]["in_domain"]["accuracy"])
                     for n, m in report["methods"].items() if n.startswith(prefix))
        if pts:
            ax.plot(*zip(*pts), style, label=label, markersize=8)
    ax.set_xlabel("mean layer applications per example (in-domain)")
    ax.set_ylabel("accuracy % (in-domain macro average)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append(_beside(out, "_pareto.png"))
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    if report.get("heatmap_bias0"):
        counts = torch.tensor(report["heatmap_bias0"], dtype=torch.float)
        frac = (counts / counts.sum(1, keepdim=True)).T
        fig, ax = plt.subplots(figsize=(9, 2.4))
        im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks([0, 1, 2], ["skip", "execute", "repeat"])
        ax.set_xlabel("layer")
        ax.set_title("routed (bias 0): share of evaluation examples per decision")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        files.append(_beside(out, "_heatmap.png"))
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    return files


def provenance(checkpoint: Path) -> dict:
    import transformers
    import vllm

    config = json.loads((Path(checkpoint) / "config.json").read_text())
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} {platform.processor()}".strip(),
            "cpus": torch.get_num_threads(), "command": " ".join(["drllm"] + sys.argv[1:]),
            "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
            "checkpoint": str(checkpoint), "routers_trained": config["drllm"].get("trained"),
            "routers_sha256": (config["drllm"].get("router_card") or {}).get("routers_sha256")}


def main(checkpoint: Path, model: str, limit_in: int | None, limit_out: int | None, biases,
         generation: int, out: Path, dtype: str | None = None, format: str | None = None,
         seed: int = 0, static: bool = True, log=print, record_card: bool = False) -> dict:
    """Run the whole evaluation, print the table, write JSON/Markdown/PNGs;
    with record_card, record the table in the shipped router card when these
    are its routers (else a small run would replace the card's table)."""
    from ..checkpoint import ROUTER_WEIGHTS_DIR, shipped_routers
    from ..config import default_dtype
    from .scoring import Scorer, make_engine

    dtype = dtype or default_dtype()
    llm = make_engine(checkpoint, dtype=dtype)
    report = {**provenance(checkpoint), "dtype": dtype}
    identity = {"model": model, "routers_sha256": report["routers_sha256"], "dtype": dtype}
    score_log = ScoreLog(_beside(out, ".scores.jsonl.gz"), identity)
    report.update(run_eval(Scorer(llm), checkpoint, limit_in, limit_out, biases, format, seed,
                           static=static, log=log, score_log=score_log))
    if generation:
        report["generation_base"] = generation_baseline(llm, generation, seed=seed)
        log("free-form generation, base model: " + ", ".join(
            f"{k} {v['accuracy']:.1f}% of {v['n']}" for k, v in report["generation_base"].items()))
    md = table(report)
    print("\n" + md + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    _beside(out, ".json").write_text(json.dumps(report, indent=2) + "\n")
    _beside(out, ".md").write_text(
        f"# Dr.LLM evaluation ({report['date']}, {report['machine']}, {report['cpus']} CPUs)"
        f"\n\n`{report['command']}`\n\n{md}\n")
    files = plots(report, out)
    log(f"wrote {_beside(out, '.json')}, {_beside(out, '.md')}, "
        + ", ".join(map(str, files)))
    shipped = shipped_routers(model)
    if record_card and not (shipped and shipped.card["routers_sha256"] == report["routers_sha256"]):
        log(f"--card: nothing recorded: the routers evaluated are not the ones shipped for {model}")
    elif record_card:  # these are the shipped routers
        card_path = ROUTER_WEIGHTS_DIR / model / "card.json"
        card = json.loads(card_path.read_text())
        card["evaluation"] = {"command": report["command"], "date": report["date"],
                              "limits": report["limits"], "seed": report["seed"],
                              "formats": report["formats"], "table": md,
                              "methods": {n: m["tasks"] for n, m in report["methods"].items()}}
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        log(f"recorded the table in {card_path}")
    return report
