"""Grouping by schedule (bounded waiting) and the benchmark's counts.

The quick benchmark asserts nothing about speed (machines are noisy), only
that what it counts is right: the runner's layer applications agree with
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
        assert none["attainable"] == pytest.approx(none["x_plain_eager"])
        assert rows[(c, "full")]["attainable"] == pytest.approx(1.0)
        assert rows[(c, "plain-eager")]["x_plain_eager"] == pytest.approx(1.0)
        # every case ran interleaved with a plain eager run, once per round
        assert len(rows[(c, "full")]["round_ratios"]) == quick["settings"]["rounds"]


def test_attainable_speedup_by_hand():
    bench = load_bench()
    # full 10 tok/s (0.1 s), no layers 50 tok/s (0.02 s): half the layers -> 0.1 / 0.06
    assert bench.attainable(10.0, 50.0, 0.5) == pytest.approx(0.1 / 0.06)
    assert bench.attainable(10.0, 50.0, 1.0) == pytest.approx(1.0)
    assert bench.attainable(10.0, 50.0, 0.0) == pytest.approx(5.0)


def test_speed_targets_by_hand():
    bench = load_bench()

    def row(c, case, ratios, ideal=1.0, **kw):
        import statistics

        x = statistics.median(ratios)
        return {"concurrency": c, "case": case, "x_plain_eager": x, "round_ratios": ratios,
                "ideal_mean": ideal, "of_ideal": x / ideal, **kw}

    rows = [row(c, "plain-eager", [1.0, 1.0, 1.0]) for c in (1, 8, 64)] + [
        row(1, "full", [0.99, 0.97, 0.96]),  # median 0.97: missed
        row(8, "full", [0.95, 0.99, 1.02]),  # median 0.99: met, though one round is low
        row(1, "skip-3", [1.01, 1.2, 0.9], ideal=30 / 27),  # 0.909 of ideal
        row(8, "skip-3", [0.5, 0.5, 0.5], ideal=30 / 27),  # not a target batch
        row(64, "skip-9", [1.2, 1.3, 1.0], ideal=30 / 21),  # 0.84 of ideal
        row(64, "skip-all", [9.0]),
        row(8, "pool4-grouping-on", [1.2], relative_to="grouping-off"),
        row(64, "plain-eager-b", [0.96, 1.01, 1.0]),  # the control: reported, never judged
    ]
    got = {(t["concurrency"], t["target"].split()[0]): t for t in bench.targets(rows)
           if t["concurrency"] != "all"}
    assert set(got) == {(1, "full"), (8, "full"), (1, "skip-3"), (64, "skip-9"),
                        (64, "control:")}
    assert (got[1, "full"]["ratio"], got[1, "full"]["met"]) == (0.97, False)
    assert (got[8, "full"]["low"], got[8, "full"]["high"], got[8, "full"]["met"]) == \
        (0.95, 1.02, True)
    assert got[1, "skip-3"]["ratio"] == pytest.approx(0.909) and got[1, "skip-3"]["met"]
    assert got[1, "skip-3"]["low"] == pytest.approx(0.9 * 27 / 30)
    assert got[64, "skip-9"]["ratio"] == pytest.approx(0.84) and not got[64, "skip-9"]["met"]
    control = got[64, "control:"]
    assert (control["ratio"], control["need"], control["met"]) == (1.0, None, None)
    text = bench.targets_text(bench.targets(rows))
    assert "c=1   full / plain eager         need 0.98: 0.970 MISSED (rounds 0.960-0.990, 3)" \
        in text, text
    assert bench.rounds_at(1, 2) == bench.rounds_at(8, 2) == 3 and bench.rounds_at(32, 2) == 2

    # pooled over batches: full's per-round ratios 1, 2, 0.5, 1, 1, 0.5 -> median 1.0
    rows = [row(1, "full", [1, 2, 0.5]), row(8, "full", [1, 1, 0.5]),
            row(1, "plain-eager-b", [1, 1, 1]), row(8, "plain-eager-b", [2, 2, 2])]
    pooled = {t["target"]: t for t in bench.targets(rows) if t["concurrency"] == "all"}
    full = pooled["full / plain eager, pooled"]
    assert (full["rounds"], full["ratio"], full["low"], full["high"], full["met"]) == \
        (6, 1.0, 0.5, 2.0, True)
    control = pooled["control: plain eager B / A, pooled"]
    assert (control["ratio"], control["met"]) == (1.5, None)


def test_full_mode_token_agreement_by_hand():
    bench = load_bench()

    def case(*rounds):
        return bench.Case("x", "x", [None] * 3, rounds=[{"tokens": t} for t in rounds])

    plain = case([[1], [2], [3]], [[1], [2], [4]])  # request 2 flips between plain's rounds
    full = case([[1], [5], [4]], [[1], [5], [3]])  # request 1 never matches
    got = bench.token_agreement(full, plain)
    assert got == {"requests": 3, "equal_first_round": 1, "plain_equal_to_itself": 2,
                   "never_equal": [1]}


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
    assert bench.parse_args(["--cases", "plain-eager-b", "full"]).control
    assert not bench.parse_args(["--cases", "full"]).control



def test_interleaved_runs_take_turns_and_count_only_their_own_steps():
    """The bench's timing rule, on two stand-in engines whose steps cost known
    times (vLLM itself runs through it in the quick benchmark above)."""
    import time
    from types import SimpleNamespace

    bench = load_bench()
    log = []

    class Engine:
        def __init__(self, name, steps, seconds):
            self.name, self.left, self.seconds, self.ids = name, steps, seconds, []

        def add_request(self, request_id, prompt, params):
            self.ids.append((request_id, prompt["prompt_token_ids"]))

        def has_unfinished_requests(self):
            return self.left > 0

        def step(self):
            log.append(self.name)
            time.sleep(self.seconds)
            self.left -= 1
            return [SimpleNamespace(request_id=i, outputs=[SimpleNamespace(token_ids=[7])],
                                    finished=self.left == 0, prompt_token_ids=p,
                                    metrics=SimpleNamespace(scheduled_ts=0.0))
                    for i, p in self.ids]

    slow = SimpleNamespace(llm_engine=Engine("slow", 3, 0.05))
    fast = SimpleNamespace(llm_engine=Engine("fast", 5, 0.001))
    got = bench.interleaved([(slow, bench.Case("a", "plain-a", [None] * 2)),
                             (fast, bench.Case("b", "plain-b", [None] * 2))], [[1, 2]], 5)
    assert log == ["slow", "fast"] * 3 + ["fast"] * 2  # turns until one is done
    assert got[0]["seconds"] >= 3 * 0.05
    assert got[1]["seconds"] < 0.05  # the slow engine's steps are not counted
    assert [r["out_tokens"] for r in got] == [2 * 3, 2 * 5]
    assert got[0]["ttft_s"] == pytest.approx(got[0]["seconds"] / 3, rel=0.5)
