"""The supervision pipeline: tasks and splits, cloze scoring, MCTS, loss, training."""

from __future__ import annotations

import math

import pytest
import torch

from drllm_vllm.pipeline import tasks
from drllm_vllm.pipeline.mcts import MCTSConfig, Search, children_of
from drllm_vllm.pipeline.train import (StackedRouters, TrainConfig, class_weights, focal_loss,
                              per_class, train)


# ---------------------------------------------------------------- splits

@pytest.mark.parametrize("task", tasks.IN_DOMAIN)
def test_no_eval_question_in_search(task):
    tasks.check_disjoint(task)
    search, evaluation = tasks.load(task, "search"), tasks.load(task, "eval")
    assert len(search) > 250 and len(evaluation) > 250
    # nor is an evaluation question shown with its answer in a search prompt
    # (as a few-shot example), nor a search question in an evaluation prompt
    def answered(e):
        return e.contexts[e.gold].rsplit("\n\n", 1)[-1] + e.continuations[e.gold]

    search = tasks.load(task, "search", format="five-shot")
    evaluation = tasks.load(task, "eval", format="five-shot")
    for shown, hidden in ((search, evaluation), (evaluation, search)):
        blocks = {b for e in shown for b in e.contexts[0].split("\n\n")[:-1]}
        leaked = [answered(e) for e in hidden if answered(e) in blocks]
        assert not leaked, leaked[:3]


def test_split_check_catches_a_leak(monkeypatch):
    leaky = dict(tasks.SPLITS["arc_easy"], search=tasks.SPLITS["arc_easy"]["eval"])
    monkeypatch.setitem(tasks.SPLITS, "arc_easy", leaky)
    tasks._load.cache_clear()
    with pytest.raises(AssertionError, match="eval questions in search"):
        tasks.check_disjoint("arc_easy")
    tasks._load.cache_clear()


def test_task_contents_are_known():
    e = tasks.load("arithmetic", "search")[0]
    assert e.contexts[0].endswith("4 * 8 =") and e.continuations[e.gold] == " 32"
    assert len(tasks.load("mmlu", "eval")) == 14042
    assert tasks.last_boxed(r"so \boxed{\frac{1}{2}} and \boxed{x^{2}}") == "x^{2}"
    assert tasks.pick([-3.0, -4.0], (" abc", " abcdefgh")) == 1  # per character


def test_bad_task_names_are_clear():
    with pytest.raises(ValueError, match="unknown task 'arc'; accepted"):
        tasks.load("arc", "eval")
    with pytest.raises(ValueError, match="has no 'search' part"):
        tasks.load("piqa", "search")


# ---------------------------------------------------------------- scoring

def test_engine_scoring_matches_transformers(dr_llm, oracle):
    """Full-mode cloze picks equal log-likelihoods computed with transformers."""
    from drllm_vllm.pipeline.scoring import Scorer

    scorer = Scorer(dr_llm)
    examples = tasks.load("arc_challenge", "eval", 4) + tasks.load("arithmetic", "eval", 2)
    got = scorer.score([(e, {"drllm_mode": "full"}) for e in examples])
    for e, r in zip(examples, got):
        ids, _ = scorer.encoded(e)
        lps = []
        for choice, p in enumerate(ids):
            n = len(scorer.tokenizer.encode(e.continuations[choice], add_special_tokens=False))
            with torch.no_grad():
                logits = oracle.model(torch.tensor([p])).logits[0].float()
            logp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(p[1:])[:, None])
            lps.append(logp[-n:].sum().item())
        assert r.pred == tasks.pick(lps, e.continuations), (e.task, e.doc_id)
        assert r.schedule == (1,) * 30 and r.layer_applications == 30


def test_choices_are_routed_on_the_question_alone(dr_llm, oracle):
    """All choices run under the schedule the routers pick on the shared prefix."""
    from drllm_vllm.pipeline.scoring import Scorer

    scorer = Scorer(dr_llm)
    examples = (tasks.load("arc_easy", "eval", 3) + tasks.load("winogrande", "eval", 2)
                + tasks.load("arithmetic", "eval", 2))  # five-shot: pooled after the shots
    for bias in (0.0, -0.3):
        got = scorer.score([(e, {"drllm_bias": bias}) for e in examples])
        for e, r in zip(examples, got):
            ids, shared = scorer.encoded(e)
            assert shared < min(len(p) for p in ids)
            start, end = scorer.route_span(e)
            assert (start > 0) == (e.task == "arithmetic") and end == shared
            _, expected = oracle.forward(ids[0][:end], bias=bias, route_start=start)
            assert r.schedule == expected, (e.task, e.doc_id, bias)


def test_search_resumes_and_rewards_are_correctness(dr_llm, tmp_path):
    from drllm_vllm.pipeline.scoring import Scorer
    from drllm_vllm.pipeline.search import read_records, run_search

    scorer = Scorer(dr_llm)
    out = tmp_path / "search.jsonl"
    cfg = MCTSConfig(simulations=3)
    run_search(scorer, out, ("arithmetic",), limit=2, config=cfg, pool=2)
    first = read_records(out)
    run_search(scorer, out, ("arithmetic",), limit=3, config=cfg, pool=2)
    records = read_records(out)
    assert records[:2] == first and len(records) == 3
    examples = {e.doc_id: e for e in tasks.load("arithmetic", "search")}
    base = scorer.score([(examples[r["doc_id"]], {"drllm_mode": "full"}) for r in records])
    for r, b in zip(records, base):
        assert r["default_correct"] == b.correct
        assert r["forward_passes"] == r["paths"] * 10  # ten choices per question
        if r["best"] is not None:
            forced = scorer.score([(examples[r["doc_id"]],
                                    {"drllm_mode": "schedule", "drllm_schedule": r["best"]})])
            assert forced[0].correct


# ---------------------------------------------------------------- MCTS

def test_reward_needs_the_gold_to_keep_its_likelihood():
    from drllm_vllm.pipeline.scoring import Scored
    from drllm_vllm.pipeline.search import reward

    full = Scored(pred=1, correct=False, schedule=(1,) * 3, layer_applications=3, gold_score=-0.50)
    right = Scored(0, True, (1, 0, 1), 2, gold_score=-0.52)
    broken = Scored(0, True, (0, 0, 1), 1, gold_score=-1.60)  # right for the wrong reason
    wrong = Scored(1, False, (1, 0, 1), 2, gold_score=-0.40)
    assert [reward(r, full) for r in (right, broken, wrong)] == [1.0, 0.0, 0.0]
    assert reward(right, full, tolerance=0.01) == 0.0


# ---------------------------------------------------------------- labels

def test_label_filter_keeps_only_right_answers_with_room_to_spare():
    from drllm_vllm.pipeline.labels import LabelFilter, keep, margin, robust

    f = LabelFilter(min_margin=0.05, tolerance=0.05)
    assert margin([-0.9, -1.0, -1.3], 0) == pytest.approx(0.1)
    assert margin([-0.9, -1.0, -1.3], 2) == pytest.approx(-0.4)
    full_wrong = [-1.00, -0.98, -1.5]  # gold 0 loses by 0.02
    assert robust(full_wrong, [-0.90, -1.00, -1.4], 0, f)  # now wins by 0.10: kept
    assert not robust(full_wrong, [-0.99, -1.00, -1.4], 0, f)  # wins by 0.01: luck
    full_right = [-0.70, -1.00, -1.5]  # gold wins by 0.30
    assert robust(full_right, [-0.72, -0.98, -1.5], 0, f)  # 0.26: lost 0.04, within 0.05
    assert not robust(full_right, [-0.80, -0.95, -1.5], 0, f)  # 0.15: lost 0.15
    assert not robust(full_right, [-0.80, -0.95, -1.5], 0, LabelFilter(0.05, tolerance=0.1))
    assert robust(full_right, [-0.80, -0.95, -1.5], 0, LabelFilter(0.05, tolerance=0.2))

    def rec(doc, fmt, improved, best=(1, 0, 1)):
        return {"task": "arc_easy", "doc_id": doc, "format": fmt, "best": list(best),
                "default_correct": not improved}

    def row(r, full, path):
        return {(r["task"], r["doc_id"], r["format"], tuple(r["best"])):
                {"gold": 0, "full_scores": full, "path_scores": path}}

    records = [rec(1, "zero-shot", True), rec(2, "zero-shot", False), rec(3, "chat", True),
               {**rec(4, "chat", True), "best": None}]  # unlabelled: never trained on
    scores = {**row(records[0], full_wrong, [-0.90, -1.00, -1.4]),
              **row(records[1], full_right, [-0.80, -0.95, -1.5]),
              **row(records[2], full_wrong, [-0.99, -1.00, -1.4])}
    kept, counts = keep(records, scores, f)
    assert [r["doc_id"] for r in kept] == [1]
    assert counts == {"zero-shot": {"labelled": 2, "kept": 1, "improved": 1, "improved_kept": 1},
                      "chat": {"labelled": 1, "kept": 0, "improved": 1, "improved_kept": 0}}
    assert [r["doc_id"] for r in keep(records, None, None)[0]] == [1, 2, 3]  # no filter
    with pytest.raises(ValueError, match="1 of 3 labels have no scores.*--rescore-labels"):
        keep(records, {k: v for k, v in scores.items() if k[1] != 3}, f)


def test_training_reads_every_search_file_in_its_own_format(tmp_path):
    import json

    from drllm_vllm.pipeline.labels import SCORES_FILE, card_labels
    from drllm_vllm.pipeline.search import load_records, search_files
    from drllm_vllm.pipeline.train import is_validation

    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    L1, L2 = [1, 0, 1], [0, 1, 1]
    old = [{"task": "arc_easy", "doc_id": 1, "shots": 0, "default_correct": True, "best": L1},
           {"task": "arithmetic", "doc_id": 2, "shots": 5, "default_correct": False, "best": L2},
           {"task": "arc_easy", "doc_id": 3, "shots": 0, "default_correct": False, "best": None}]
    chat = [{"task": "arc_easy", "doc_id": 1, "format": "chat", "shots": 0,
             "default_correct": False, "best": L2}]
    write("search.jsonl", old)
    write("search_chat.jsonl", chat)
    write(SCORES_FILE, [{"task": "arc_easy", "doc_id": 1, "format": "zero-shot", "best": L1,
                         "gold": 0, "full_scores": [-1, -2], "path_scores": [-1, -2]},
                        {"task": "arithmetic", "doc_id": 2, "format": "five-shot", "best": L2,
                         "gold": 1, "full_scores": [-1, -2], "path_scores": [-1.5, -1.49]},
                        {"task": "arc_easy", "doc_id": 1, "format": "chat", "best": L2,
                         "gold": 0, "full_scores": [-2, -1], "path_scores": [-1, -2]}])
    files = search_files(tmp_path)
    assert [f.name for f in files] == ["search.jsonl", "search_chat.jsonl"]  # not the scores
    records = load_records(files)
    # records without a format were searched in their task's default
    assert [(r["task"], r["format"], r["file"]) for r in records] == [
        ("arc_easy", "zero-shot", "search.jsonl"), ("arithmetic", "five-shot", "search.jsonl"),
        ("arc_easy", "zero-shot", "search.jsonl"), ("arc_easy", "chat", "search_chat.jsonl")]
    with pytest.raises(ValueError, match="arc_easy doc 1 .chat. is in both search_chat.jsonl"):
        load_records(files + [tmp_path / "search_chat.jsonl"])
    # a card naming one file (written before several) derives from that file alone
    assert [r["best"] for r in card_labels(tmp_path, {"search": {"file": "search.jsonl"}})] == [L1, L2]
    both = {"search": {"files": ["search.jsonl", "search_chat.jsonl"]}}
    assert [r["best"] for r in card_labels(tmp_path, both)] == [L1, L2, L2]
    filtered = {**both, "labels": {"filter": {"min_margin": 0.05, "tolerance": 0.05},
                                   "scores_file": SCORES_FILE}}
    assert [(r["doc_id"], r["format"]) for r in card_labels(tmp_path, filtered)] == [
        (1, "zero-shot"), (1, "chat")]  # arithmetic won by 0.01: dropped
    assert card_labels(tmp_path, {"search": {"files": ["search_gone.jsonl"]}}) is None
    # the hold-out is by example, so a question's formats share a side; seeded
    assert is_validation("arc_easy", 7, 0.5) == is_validation("arc_easy", 7, 0.5, seed=0)
    sides = [[is_validation("arc_easy", d, 0.5, seed=s) for d in range(200)] for s in (0, 1)]
    assert sides[0] != sides[1] and 60 < sum(sides[1]) < 140


def run_to_end(search: Search, reward) -> Search:
    while (p := search.pending()) is not None:
        search.report(p, reward(p))
    return search


def test_children_are_the_three_actions():
    kids = set(children_of((1, 1, 1)))
    assert (0, 1, 1) in kids and (0, 0, 1) in kids and (1, 2, 1) in kids
    assert (0, 1, 0) not in kids  # skips are consecutive
    assert set(children_of((2, 1))) == {(1, 1), (0, 1), (1, 0), (2, 0), (2, 2)}


def test_mcts_finds_the_known_best_path():
    for target, budget in (((1, 1, 0, 1, 1, 1, 1, 1), 50),  # one action deep
                           ((1, 0, 1, 1, 1, 0, 1, 1), 400)):  # two actions deep
        s = run_to_end(Search(8, MCTSConfig(simulations=budget, early_stop=False)),
                       lambda p: float(p == target))
        assert s.best == target and s.default_correct is False
    # among several correct paths the shortest wins, even with early stopping off
    good = {(1, 1, 1, 0), (1, 0, 0, 1), (1, 0, 1, 1)}
    s = run_to_end(Search(4, MCTSConfig(simulations=400, early_stop=False)),
                   lambda p: float(p in good))
    assert s.best == (1, 0, 0, 1)
    assert s.paths_evaluated <= 400 and s.simulations == 400


def test_mcts_stops_early_and_memoises():
    # correct default; one skip is wrong, two skips are right: stop at a saving of 2
    s = run_to_end(Search(6), lambda p: float(sum(p) != 5))
    assert s.default_correct is True and sum(s.best) == 4 and s.simulations < 50
    calls = []
    s = run_to_end(Search(6, MCTSConfig(simulations=50)), lambda p: calls.append(p) or 0.0)
    assert s.best is None and s.simulations == 50 and len(calls) == len(set(calls))


# ---------------------------------------------------------------- loss and training

def test_focal_loss_and_class_weights_by_hand():
    alpha = class_weights(torch.tensor([1, 98, 1]))
    assert torch.allclose(alpha, torch.tensor([1.492012, 0.015975, 1.492012]), atol=1e-5)
    # an absent class weighs nothing; the present ones share the sum of 3
    assert torch.allclose(class_weights(torch.tensor([1, 98, 0])),
                          torch.tensor([2.968219, 0.031781, 0.0]), atol=1e-5)
    # so does a class under min_count: one repeat label must not outweigh the rest
    assert torch.allclose(class_weights(torch.tensor([1, 98, 1]), min_count=2),
                          torch.tensor([0.0, 3.0, 0.0]), atol=1e-5)
    logits = torch.tensor([[0.0, math.log(3.0), 0.0]])  # p = 0.2, 0.6, 0.2
    loss = focal_loss(logits, torch.tensor([1]), torch.tensor([1.0, 2.0, 1.0]))
    assert loss.item() == pytest.approx(2 * 0.4 ** 2 * -math.log(0.6), rel=1e-6)  # 0.163464
    f1, recall = per_class(torch.tensor([1, 1, 0, 2]), torch.tensor([1, 0, 0, 2]))
    assert recall == [0.5, 1.0, 1.0] and f1 == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    # a class the labels never use is not averaged in; predicting it costs recall
    f1, recall = per_class(torch.tensor([1, 2, 0, 0]), torch.tensor([1, 1, 0, 0]))
    assert recall == [1.0, 0.5, None] and f1 == pytest.approx((1 + 2 / 3) / 2)


def test_training_on_a_small_cached_set_reduces_the_loss():
    g = torch.Generator().manual_seed(0)
    N, L, W, d = 96, 3, 4, 16
    base = torch.randn(N, L, 1, d, generator=g)
    x = base + 0.3 * torch.randn(N, L, W, d, generator=g)  # windows share a signal
    x = x * torch.logspace(-1, 2, d) + 5.0  # features of very different scales and offsets
    y = (base[..., 0, 0] > -0.5).long() + (base[..., 0, 1] > 0.5).long()  # 0/1/2
    mask = torch.ones(N, W, dtype=torch.bool)
    val = torch.arange(N) % 6 == 0
    cfg = TrainConfig(epochs=30, batch_size=16, warmup_steps=10, lr=3e-3, patience=None)
    untrained = StackedRouters(L, d, 32)
    untrained.set_input_stats(x[~val], mask[~val])
    alpha = class_weights(torch.bincount(y[~val].flatten(), minlength=3))
    before = focal_loss(untrained(x[~val], mask[~val]).reshape(-1, 3), y[~val].flatten(), alpha)
    groups = ["zero-shot" if i % 2 else "chat" for i in range(N)]
    model, history = train(x.half(), mask, y, val, cfg, bottleneck=32, log=lambda *_: None,
                           groups=groups)
    assert set(history[0]["val_macro_f1_by_group"]) == {"chat", "zero-shot"}
    after = focal_loss(model(x[~val], mask[~val]).reshape(-1, 3), y[~val].flatten(), alpha)
    assert after.item() < 0.5 * before.item()
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert max(h["val_macro_f1"] for h in history) > 0.45  # chance is about 1/3
    # the exported tensors have the engine's names and shapes, and the engine's
    # Router on the raw window means gives the trained logits (folded standardisation)
    from drllm_vllm.router import Router

    sd = model.state_dict_for_checkpoint()
    assert sd["model.routers.2.fc1.weight"].shape == (32, d) and len(sd) == 4 * L
    assert model.sigma.std() > 0  # the stats were set from the data
    with torch.no_grad():
        expected = model(x[:5], mask[:5])
        for layer in range(L):
            r = Router(d, 32)
            r.load_state_dict({k.split(f"routers.{layer}.")[1]: v for k, v in sd.items()
                               if f"routers.{layer}." in k})
            assert torch.allclose(r(x[:5, layer]), expected[:, layer], atol=1e-4)


def test_paired_delta_by_hand():
    from drllm_vllm.pipeline.evaluate import paired_delta

    # arc_easy differences 0, +1, -1, 0: mean 0, sample variance 2/3, se^2 = 2/3/4
    # arc_challenge differences +1, +1: mean 1, variance 0; piqa differences 0, -1
    base = [1, 0, 1, 1, 0, 0, 1, 1]
    other = [1, 1, 0, 1, 1, 1, 1, 0]
    task_of = ["arc_easy"] * 4 + ["arc_challenge"] * 2 + ["piqa"] * 2
    d = paired_delta(base, other, task_of)
    assert d["in_domain"]["delta"] == pytest.approx(50.0)
    assert d["in_domain"]["se"] == pytest.approx(100 * math.sqrt(2 / 3 / 4) / 2)
    assert d["out_of_domain"]["delta"] == pytest.approx(-50.0)
    assert d["out_of_domain"]["se"] == pytest.approx(100 * math.sqrt(0.5 / 2))
