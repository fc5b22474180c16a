"""Grouping by schedule (bounded waiting) and the benchmark's counts.

The quick benchmark asserts nothing about speed (machines are noisy), only
that what it counts is right (every case interleaved with plain vLLM
default, each run split into prefill and decode phases): the runner's layer applications agree with
the schedules each request reported, uniform skips leave exactly L-k layer
passes per decode step, full mode gives plain vLLM's tokens, and no request
is overtaken by more younger ones than the grouping bound allows.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from drllm_vllm.grouping import Waiting, admission_order, record_admissions

A, B, C = (1, 1, 0, 1), (0, 1, 1, 1), (1, 0, 1, 1)


def test_requests_matching_the_running_batch_go_first():
    waiting = [Waiting(B, 0), Waiting(A, 1), Waiting(C, 2), Waiting(A, 3), Waiting(None, 4)]
    assert admission_order(waiting, running_keys=[A, A, B], max_overtaken=100) == [1, 3, 0, 2, 4]


def test_with_nothing_running_the_oldest_request_picks_the_group():
    waiting = [Waiting(B, 5), Waiting(A, 1), Waiting(A, 7), Waiting(B, 2)]
    # the oldest (order 1) has A; then by distance to A (B and C differ from A in 2 layers)
    assert admission_order(waiting, running_keys=[], max_overtaken=100) == [1, 2, 3, 0]


def test_preempted_and_overdue_requests_go_first_oldest_first():
    waiting = [Waiting(A, 4), Waiting(B, 3, overtaken=9), Waiting(C, 6, resumed=True)]
    assert admission_order(waiting, running_keys=[A], max_overtaken=9) == [1, 2, 0]


def simulate(max_overtaken: int, steps: int = 200, per_step: int = 2) -> tuple[bool, int]:
    """A lone B request among a stream of A requests that never ends; the
    batch admits `per_step` requests a step. Returns (B admitted, its overtaken count)."""
    waiting = [Waiting(B, 0)]
    order = 1
    for _ in range(steps):
        for _ in range(per_step + 1):  # more arrive than can be admitted
            waiting.append(Waiting(A, order))
            order += 1
        ranked = [waiting[i] for i in admission_order(waiting, [A], max_overtaken)]
        admitted, waiting = ranked[:per_step], ranked[per_step:]
        record_admissions(waiting, [w.order for w in admitted])
        if any(w.key == B for w in admitted):
            return True, next(w for w in admitted if w.key == B).overtaken
    return False, waiting[0].overtaken


def test_a_request_with_a_rare_schedule_does_not_starve():
    admitted, overtaken = simulate(max_overtaken=10)
    assert admitted and overtaken <= 10 + 2 - 1


def test_without_the_bound_the_rare_request_would_starve():
    admitted, _ = simulate(max_overtaken=10**9)
    assert not admitted  # the bound, not luck, admits it above


def load_bench():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"
    spec = importlib.util.spec_from_file_location("drllm_bench_test", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory, checkpoint):
    bench = load_bench()
    return bench.main(["--quick", "--results-dir", str(tmp_path_factory.mktemp("bench")),
                       "--out", "quick"])


def test_quick_benchmark_counts_are_right(quick):
    assert quick["errors"] == []
    L = quick["num_layers"]
    rows = {(r["concurrency"], r["case"]): r for r in quick["rows"]}
    for c in (1, 4):
        assert rows[(c, "full")]["layers_per_token"] == L
        for k in (3, 6, 9):
            r = rows[(c, f"skip-{k}")]
            assert r["layers_per_token"] == r["union_per_step"] == L - k
            assert r["ideal_mean"] == pytest.approx(L / (L - k))
        assert rows[(c, "hetero")]["union_per_step"] <= L
        none = rows[(c, "skip-all")]
        assert none["layers_per_token"] == none["union_per_step"] == 0
        # with no layer left, the attainable speed-up is the one measured
        assert none["attainable"] == pytest.approx(none["x_plain_default"])
        assert rows[(c, "full")]["attainable"] == pytest.approx(1.0)
        assert rows[(c, "plain-default")]["x_plain_default"] == pytest.approx(1.0)
        assert rows[(c, "plain-eager")]["x_plain_eager"] == pytest.approx(1.0)
        # every case ran interleaved with a plain default run, once per round, and
        # each run's time splits into its prefill and decode phases
        full = rows[(c, "full")]
        assert [len(full["x_by_phase"][p]["round_ratios"]) for p in ("all", "prefill", "decode")] \
            == [quick["settings"]["rounds"]] * 3
        for ph in full["round_phases"] + full["reference_phases"]:
            assert ph["prefill"] > 0 and ph["decode"] > 0
            assert ph["prefill"] + ph["decode"] == pytest.approx(ph["all"])
    got = {(t["concurrency"], t["target"]) for t in quick["targets"]}
    assert {(1, f"full / plain default, {p}") for p in ("all", "prefill", "decode")} <= got
    routed = [t for t in quick["targets"] if t["target"] == "routed+0.00 / plain default"]
    assert [t["concurrency"] for t in routed] == [1, 4]
    assert routed[0]["accuracy"] == quick["accuracy"]["routed+0.00"]
    assert routed[0]["accuracy_se"] == quick["accuracy_se"]["routed+0.00"] is not None


def test_attainable_speedup_by_hand():
    bench = load_bench()
    # full 10 tok/s (0.1 s), no layers 50 tok/s (0.02 s): half the layers -> 0.1 / 0.06
    assert bench.attainable(10.0, 50.0, 0.5) == pytest.approx(0.1 / 0.06)
    assert bench.attainable(10.0, 50.0, 1.0) == pytest.approx(1.0)
    assert bench.attainable(10.0, 50.0, 0.0) == pytest.approx(5.0)


def test_speed_targets_by_hand():
    bench = load_bench()

    def row(c, case, ratios, ideal=1.0, prefill=None, decode=None, **kw):
        """A row whose per-round ratios to plain default are `ratios` (and, in
        its prefill and decode phases, `prefill` / `decode`, default the same)."""
        per = {"all": ratios, "prefill": prefill or ratios, "decode": decode or ratios}
        x = bench.by_phase([{"phases": dict.fromkeys(bench.PHASES, 1.0),
                             "reference": {p: per[p][i] for p in bench.PHASES}}
                            for i in range(len(ratios))])
        return {"concurrency": c, "case": case, "x_plain_default": x["all"]["ratio"],
                "x_by_phase": x, "ideal_mean": ideal, **kw}

    rows = [row(c, "plain-default", [1.0, 1.0, 1.0], accuracy=0.475, accuracy_se=0.0799)
            for c in (1, 8, 64)] + [
        row(1, "full", [0.99, 0.96, 0.95]),  # median 0.96: missed
        # met over the whole run, though one round is low; missed in the prefill phase
        row(8, "full", [0.95, 0.99, 1.02], prefill=[0.9, 0.96, 1.0], decode=[1.0, 1.0, 1.0]),
        row(1, "skip-3", [1.01, 1.2, 0.9], ideal=30 / 27),  # 0.909 of ideal
        row(8, "skip-3", [0.5, 0.5, 0.5], ideal=30 / 27),  # not a target batch
        row(64, "skip-9", [1.2, 1.3, 1.0], ideal=30 / 21),  # 0.84 of ideal
        row(64, "skip-all", [9.0]),
        row(1, "routed+0.00", [1.1, 1.0, 0.9], accuracy=0.4, accuracy_se=0.0784),  # met
        row(64, "routed+0.00", [0.8, 0.9, 0.95], accuracy=0.4),  # missed
        row(1, "routed-0.25", [2.0], accuracy=0.3),  # no target at this bias
        row(8, "pool4-grouping-on", [1.2], relative_to="grouping-off"),
        row(64, "plain-default-b", [0.96, 1.01, 1.0]),  # the control: reported, never judged
    ]
    checks = bench.targets(rows)
    got = {(t["concurrency"], t["target"]): t for t in checks if t["concurrency"] != "all"}
    full = [f"full / plain default, {p}" for p in ("all", "prefill", "decode")]
    assert set(got) == {(c, f) for c in (1, 8) for f in full} | {
        (1, "skip-3 / ideal 1.11"), (64, "skip-9 / ideal 1.43"),
        (1, "routed+0.00 / plain default"), (64, "routed+0.00 / plain default"),
        (64, "control: plain default B / A")}
    assert (got[1, full[0]]["ratio"], got[1, full[0]]["met"]) == (0.96, False)
    assert (got[8, full[0]]["low"], got[8, full[0]]["high"], got[8, full[0]]["met"]) == \
        (0.95, 1.02, True)
    assert (got[8, full[1]]["ratio"], got[8, full[1]]["phase"], got[8, full[1]]["met"]) == \
        (0.96, "prefill", False)
    assert (got[8, full[2]]["ratio"], got[8, full[2]]["met"]) == (1.0, True)
    skip3 = got[1, "skip-3 / ideal 1.11"]
    assert skip3["ratio"] == pytest.approx(0.909) and skip3["met"]
    assert skip3["low"] == pytest.approx(0.9 * 27 / 30)
    skip9 = got[64, "skip-9 / ideal 1.43"]
    assert skip9["ratio"] == pytest.approx(0.84) and not skip9["met"]
    routed = got[1, "routed+0.00 / plain default"]
    assert (routed["ratio"], routed["need"], routed["met"], routed["accuracy"],
            routed["plain_accuracy"]) == (1.0, 1.0, True, 0.4, 0.475)
    assert not got[64, "routed+0.00 / plain default"]["met"]
    control = got[64, "control: plain default B / A"]
    assert (control["ratio"], control["need"], control["met"]) == (1.0, None, None)
    text = bench.targets_text(checks)
    for line in (
            "c=1   full / plain default, all      need 0.97: 0.960 MISSED (rounds 0.950-0.990, 3)",
            "c=8   full / plain default, prefill  need 0.97: 0.960 MISSED (rounds 0.900-1.000, 3)",
            "c=8   full / plain default, decode   need 0.97: 1.000 met (rounds 1.000-1.000, 3)",
            "c=1   routed+0.00 / plain default    need 1.00: 1.000 met (rounds 0.900-1.100, 3); "
            "accuracy 0.400 ± 0.078 (plain default 0.475 ± 0.080)"):
        assert line in text, text
    assert "eager" not in text  # the old targets are gone
    assert bench.rounds_at(1, 2) == bench.rounds_at(8, 2) == 3 and bench.rounds_at(32, 2) == 2

    # pooled over batches: full's per-round ratios 1, 2, 0.5, 1, 1, 0.5 -> median 1.0
    rows = [row(1, "full", [1, 2, 0.5]), row(8, "full", [1, 1, 0.5]),
            row(1, "plain-default-b", [1, 1, 1]), row(8, "plain-default-b", [2, 2, 2])]
    pooled = {t["target"]: t for t in bench.targets(rows) if t["concurrency"] == "all"}
    full = pooled["full / plain default, pooled"]
    assert (full["rounds"], full["ratio"], full["low"], full["high"], full["need"],
            full["met"]) == (6, 1.0, 0.5, 2.0, 0.97, True)
    control = pooled["control: plain default B / A, pooled"]
    assert (control["ratio"], control["met"]) == (1.5, None)


def test_full_mode_token_agreement_by_hand():
    """Rounds have their own prompts: full's tokens are compared with the
    plain runs of the same round only (plain default runs once per paired case)."""
    bench = load_bench()

    def case(name, *rounds):
        return bench.Case(name, name, [None] * 3,
                          rounds=[{"round": i, "tokens": t} for i, t in rounds])

    full = case("full", (0, [[1], [5], [3]]), (1, [[2], [6], [9]]))
    default = case("plain-default", (0, [[1], [2], [3]]), (0, [[1], [2], [4]]),
                   (1, [[2], [6], [8]]))
    eager = case("plain-eager", (0, [[1], [2], [3]]), (1, [[2], [7], [8]]))
    got = bench.token_agreement(full, [default, eager])
    # round 1's [9] would match nothing anyway; round 0's [5] matches no plain run of round 0
    assert got == {"requests": 6, "equal": {"plain-default": 4, "plain-eager": 3},
                   "plain_agree": 4, "never_equal": [[0, 1], [1, 2]]}


def test_each_round_has_prompts_of_its_own():
    bench = load_bench()

    class Tokenizer:
        def encode(self, text):
            return [ord(ch) for ch in text]

    rounds, source = bench.real_prompts(Tokenizer(), 4, 3, 64)
    assert [len(r) for r in rounds] == [4, 4, 4] and "ARC-Challenge" in source
    texts = [tuple(p) for r in rounds for p in r]
    assert len(set(texts)) == 12  # no round repeats a prompt of another
    assert all(len(p) <= 64 for p in texts)


def test_grouping_shrinks_the_union_and_keeps_waiting_bounded(quick):
    rows = {r["case"]: r for r in quick["rows"]}
    on, off = rows["pool4-grouping-on"], rows["pool4-grouping-off"]
    assert on["layers_per_token"] == pytest.approx(off["layers_per_token"])  # same requests
    assert on["union_per_step"] < off["union_per_step"]
    bound = quick["settings"]["max_overtaken"] + quick["settings"]["group_batch"] - 1
    assert on["max_overtaken"] <= bound


def test_quick_benchmark_writes_json_and_png(quick):
    out = Path(quick["settings"]["results_dir"])
    assert all((out / f"quick.{ext}").is_file() for ext in ("json", "png", "md"))


def test_bench_rejects_an_unknown_workload_and_names_the_accepted_ones(capsys):
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--cases", "full", "skip-4"])
    err = capsys.readouterr().err
    assert "'skip-4'" in err and "skip-3" in err and "pool4-grouping-off" in err
    # the control workload needs its own engine, so asking for it starts one
    assert bench.parse_args(["--cases", "plain-default-b", "full"]).control
    assert not bench.parse_args(["--cases", "full"]).control
    with pytest.raises(SystemExit):  # the reference alone: nothing to compare with it
        bench.parse_args(["--cases", "plain-default"])
    # a case comes with its reference; naming only the reference picks nothing
    cases = bench.workload_cases(1, 30, [0.0], 0)
    assert [k.name for k in bench.chosen(cases, "plain-default", ["full"])] == \
        ["plain-default", "full"]
    assert bench.chosen(cases, "plain-default", ["plain-default"]) == []


class StandIn:
    """A stand-in engine: each run of requests takes len(costs) steps, step i
    sleeping costs[i] seconds; request j gets its first token at step first[j]
    (default 0) and one token per step from then on."""

    def __init__(self, name, costs, first=(), log=None):
        self.name, self.costs, self.first, self.log = name, costs, first, log
        self.queue, self.i, self.prompts = [], 0, []

    def add_request(self, request_id, prompt, params):
        self.queue.append((request_id, prompt["prompt_token_ids"]))
        self.prompts.append(prompt["prompt_token_ids"])

    def has_unfinished_requests(self):
        return bool(self.queue)

    def step(self):
        import time
        from types import SimpleNamespace

        if self.log is not None:
            self.log.append(self.name)
        time.sleep(self.costs[self.i])
        self.i += 1
        done = self.i == len(self.costs)
        outs = [SimpleNamespace(request_id=r, outputs=[SimpleNamespace(token_ids=[7])],
                                finished=done, prompt_token_ids=p,
                                metrics=SimpleNamespace(scheduled_ts=0.0))
                for j, (r, p) in enumerate(self.queue)
                if (self.first[j] if j < len(self.first) else 0) < self.i]
        if done:
            self.queue, self.i = [], 0
        return outs


def test_interleaved_runs_take_turns_and_count_only_their_own_steps():
    """The bench's timing rule, on two stand-in engines whose steps cost known
    times (vLLM itself runs through it in the quick benchmark above)."""
    from types import SimpleNamespace

    bench = load_bench()
    log = []
    slow = SimpleNamespace(llm_engine=StandIn("slow", [0.05] * 3, log=log))
    fast = SimpleNamespace(llm_engine=StandIn("fast", [0.001] * 5, log=log))
    got = bench.interleaved([(slow, bench.Case("a", "plain-a", [None] * 2)),
                             (fast, bench.Case("b", "plain-b", [None] * 2))], [[1, 2]], 5)
    assert log == ["slow", "fast"] * 3 + ["fast"] * 2  # turns until one is done
    assert got[0]["seconds"] >= 3 * 0.05
    assert got[1]["seconds"] < 0.05  # the slow engine's steps are not counted
    assert [r["out_tokens"] for r in got] == [2 * 3, 2 * 5]
    assert got[0]["ttft_s"] == pytest.approx(got[0]["seconds"] / 3, rel=0.5)


def test_a_run_splits_into_prefill_and_decode_phases():
    """Prefill lasts until the last request has its first token (here the
    second request's, at step 2 of 4, the first request already decoding)."""
    from types import SimpleNamespace

    bench = load_bench()
    engine = SimpleNamespace(llm_engine=StandIn("e", [0.03, 0.03, 0.001, 0.001], first=[0, 1]))
    (got,) = bench.interleaved([(engine, bench.Case("a", "plain-a", [None] * 2))], [[1]], 5)
    ph = got["phases"]
    assert ph["all"] == got["seconds"] and ph["prefill"] + ph["decode"] == ph["all"]
    assert 0.06 <= ph["prefill"] < 0.06 + 0.02
    assert 0.002 <= ph["decode"] < 0.02
    assert got["out_tokens"] == 4 + 3  # the second request joined a step late


def test_plan_pairs_every_case_with_the_reference_on_each_rounds_prompts():
    """run_plan on stand-in engines: each case runs interleaved with plain
    default, round i on prompts[i] for both; the reference steps first in even
    rounds; x default by phase is the reference's phase time over the case's."""
    from types import SimpleNamespace

    bench = load_bench()
    log = []
    ref = StandIn("ref", [0.02, 0.02, 0.02], log=log)  # one prefill step, two decode steps
    fast = StandIn("fast", [0.01, 0.002, 0.002], log=log)  # prefill 2x, decode 10x faster
    engines = {"plain-default": SimpleNamespace(llm_engine=ref),
               "plain-fast": SimpleNamespace(llm_engine=fast)}
    cases = [bench.Case("plain-default", "plain-default", [None]),
             bench.Case("x", "plain-fast", [None])]
    args = SimpleNamespace(output_len=3)
    bench.run_plan([(1, cases, 2, "plain-default")], engines, [[[1]], [[2]]], args,
                   SimpleNamespace(update=lambda: None))
    assert log == ["ref", "fast"] * 3 + ["fast", "ref"] * 3  # order flips in round 1
    assert ref.prompts == fast.prompts == [[1], [2]]
    assert [r["round"] for r in cases[1].rounds] == [0, 1]
    row = bench.summarise(cases[1], 30)
    assert row["reference_phases"] == [r["phases"] for r in cases[0].rounds]
    x = row["x_by_phase"]
    assert x["prefill"]["ratio"] == pytest.approx(2, rel=0.3)
    assert x["decode"]["ratio"] == pytest.approx(10, rel=0.3)
    assert row["x_plain_default"] == x["all"]["ratio"] == pytest.approx(60 / 14, rel=0.3)
    assert bench.summarise(cases[0], 30)["x_plain_default"] == 1.0


_MALLOC_CHECK = r"""
import ctypes, ctypes.util, os, sys
sys.path.insert(0, sys.argv[1])
import throughput
os.environ.update(throughput.MALLOC_ENV)
throughput.set_malloc_thresholds()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
kept = []
for _ in range(3):  # 20 MB: under the mmap threshold, so from the heap
    p = libc.malloc(20 << 20)
    ctypes.memset(p, 1, 20 << 20)
    touched = rss()
    libc.free(p)
    kept.append(touched - rss())
print(max(kept[1:]))
os.environ["MALLOC_TRIM_THRESHOLD_"] = str(16 << 30)
try:
    throughput.set_malloc_thresholds()
except ValueError as e:
    print(e)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_bench_malloc_thresholds_keep_freed_memory_and_refuse_what_mallopt_cannot_take():
    """The bench's heap keeps what a step freed (a 16 GB trim threshold once
    wrapped to 0 in mallopt's C int: every free trimmed, every step re-faulted)."""
    import subprocess

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    out = subprocess.run([sys.executable, "-c", _MALLOC_CHECK, str(bench)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert int(out[0]) < 1 << 20, f"a freed 20 MB block went back to the OS ({out[0]} bytes)"
    assert "MALLOC_TRIM_THRESHOLD_=17179869184 is not accepted" in out[1]
