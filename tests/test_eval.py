"""Evaluation a user can trust: seeded stratified subsets, the question span
the routers pool in each prompt format, the bias sweep, and the chat check's
scoring and degenerate-answer detector. All but the last test need no engine."""

from __future__ import annotations

from collections import Counter

import pytest

from drllm_vllm.pipeline import chat_check, tasks
from drllm_vllm.pipeline.evaluate import SWEEP, paired_delta, parse_biases, table


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint):
    """The default checkpoint's own tokenizer (with its chat template), no engine."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


# ---------------------------------------------------------------- subsets

@pytest.mark.parametrize("task", ["arc_easy", "arithmetic", "piqa"])
def test_subsets_are_seeded_random_draws_not_the_first_n(task):
    whole = tasks.load(task, "eval")
    ids = [e.doc_id for e in tasks.load(task, "eval", 50, seed=0)]
    assert ids == [e.doc_id for e in tasks.load(task, "eval", 50, seed=0)]  # same seed, same
    assert ids != [e.doc_id for e in tasks.load(task, "eval", 50, seed=1)]  # another seed
    assert len(set(ids)) == 50 and ids == sorted(ids)  # distinct, in document order
    assert ids != [e.doc_id for e in whole[:50]]
    assert max(ids) > whole[len(whole) // 2].doc_id  # drawn from the whole part
    assert [e.doc_id for e in tasks.load(task, "eval", None)] == [e.doc_id for e in whole]
    assert len(tasks.load(task, "eval", 10 ** 9)) == len(whole)


@pytest.mark.parametrize("limit", [100, 1000])
def test_mmlu_subsets_are_stratified_by_subject(limit):
    whole = Counter(e.subject for e in tasks.load("mmlu", "eval"))
    assert len(whole) == 57 and sum(whole.values()) == 14042
    draws = [tasks.load("mmlu", "eval", limit, seed=s) for s in (0, 1)]
    for subset in draws:
        got = Counter(e.subject for e in subset)
        assert sum(got.values()) == limit
        for subject, n in whole.items():  # proportional allocation, within one
            assert abs(got[subject] - limit * n / 14042) < 1, subject
        if limit == 1000:
            assert set(got) == set(whole)  # every subject represented
    # the allocation depends on the sizes only; which questions, on the seed
    assert Counter(e.subject for e in draws[0]) == Counter(e.subject for e in draws[1])
    assert {e.doc_id for e in draws[0]} != {e.doc_id for e in draws[1]}


def test_proportional_allocation_by_hand():
    items = ["a"] * 6 + ["b"] * 3 + ["c"]
    # shares 3, 1.5, 0.5: floors 3, 1, 0; the one left over goes to the largest
    # remainder, a tie of b and c broken by name
    got = tasks.sample(list(enumerate(items)), 5, seed=0, salt="t", stratum=lambda x: x[1])
    assert Counter(s for _, s in got) == {"a": 3, "b": 2}
    assert got == sorted(got)
    assert got == tasks.sample(list(enumerate(items)), 5, 0, "t", lambda x: x[1])
    with pytest.raises(ValueError, match="limit = 0 is not accepted; use a positive int"):
        tasks.sample(items, 0, 0, "t")


def test_bad_format_and_limit_are_clear():
    with pytest.raises(ValueError, match="format '3-shot' is not accepted; use one of "
                                         "zero-shot, five-shot, chat"):
        tasks.load("arc_easy", "eval", 5, "3-shot")
    with pytest.raises(ValueError, match="limit = -1"):
        tasks.load("arc_easy", "eval", -1)
    with pytest.raises(ValueError, match="unknown generation set 'gsm'"):
        tasks.generation_examples("gsm", 5)


def test_generation_subsets_are_seeded():
    assert tasks.generation_examples("math", 20, seed=0) == tasks.generation_examples("math", 20)
    assert tasks.generation_examples("math", 20, seed=0) != tasks.generation_examples("math", 20, 1)
    rows = tasks.generation_examples("gsm8k", None)
    assert tasks.generation_examples("gsm8k", 20) != rows[:20]


# ---------------------------------------------------------------- question span per format

def span_text(tok, e):
    ids, shared = tasks.encode(tok, e)
    start, end = tasks.route_span(tok, e, ids[0], shared)
    return ids, shared, start, end, tok.decode(ids[0][start:end])


@pytest.mark.parametrize("task", ["arc_easy", "arithmetic", "mmlu"])
def test_zero_shot_span_is_the_whole_question(hf_tokenizer, task):
    for e in tasks.load(task, "eval", 3, "zero-shot"):
        ids, shared, start, end, text = span_text(hf_tokenizer, e)
        assert (start, end) == (0, shared) and text == e.contexts[0]
        assert "\n\n" not in text or task == "mmlu"  # mmlu: its subject line is in the question


@pytest.mark.parametrize("task", ["arc_challenge", "arithmetic"])
def test_five_shot_span_is_the_question_after_the_shots(hf_tokenizer, task):
    for e in tasks.load(task, "eval", 3, "five-shot"):
        ids, shared, start, end, text = span_text(hf_tokenizer, e)
        shots, _, question = e.contexts[0].rpartition("\n\n")
        assert shots.count("\n\n") >= 4  # five examples before it
        assert hf_tokenizer.decode(ids[0][:start]) == shots
        assert text == "\n\n" + question and end == shared


@pytest.mark.parametrize("task", ["arc_easy", "arithmetic", "mmlu", "boolq"])
def test_chat_span_is_the_user_turn(hf_tokenizer, task):
    for e in tasks.load(task, "eval", 3, "chat"):
        ids, shared, start, end, text = span_text(hf_tokenizer, e)
        assert text == e.contexts[0]  # the question block, as the user turn's content
        assert hf_tokenizer.decode(ids[0][:start]).endswith("<|im_start|>user\n")
        assert "You are a helpful AI assistant" in hf_tokenizer.decode(ids[0][:start])
        assert hf_tokenizer.decode(ids[0][end:]) == (
            "<|im_end|>\n<|im_start|>assistant\n" + e.continuations[0])
        # the prompt is what LLM.chat sends: the template's own tokens, then the choice
        chat = hf_tokenizer.apply_chat_template([{"role": "user", "content": e.contexts[0]}],
                                                add_generation_prompt=True, tokenize=False)
        assert ids[0][:shared] == hf_tokenizer.encode(chat, add_special_tokens=False)[:shared]
        assert not e.continuations[0].startswith(" ")


def test_chat_span_stops_where_winogrande_choices_differ(hf_tokenizer):
    for e in tasks.load("winogrande", "eval", 3, "chat"):
        ids, shared, start, end, text = span_text(hf_tokenizer, e)
        assert end == shared and ids[0][end] != ids[1][end]
        assert e.contexts[0].startswith(text) and len(text) < len(e.contexts[0])


def test_a_template_that_rewrites_the_question_is_refused(hf_tokenizer):
    class Shouting:
        chat_template = "x"

        def apply_chat_template(self, messages, **kw):
            return "<user>" + messages[0]["content"].upper() + "</user>"

    e = tasks.load("arc_easy", "eval", 1, "chat")[0]
    with pytest.raises(ValueError, match="chat template changes the user turn's text"):
        tasks.prompt_parts(Shouting(), e, e.contexts[0])


# ---------------------------------------------------------------- bias sweep, paired rows

def test_bias_sweep_and_bad_biases():
    assert SWEEP == tuple(round(x / 10, 1) for x in range(-10, 11))
    assert parse_biases("sweep") == list(SWEEP) and 0.0 in SWEEP and len(SWEEP) == 21
    assert parse_biases("-0.3,0") == [-0.3, 0.0]
    for bad in ("1.5", "fast", ""):
        with pytest.raises(ValueError, match="use 'sweep' or comma-separated numbers in"):
            parse_biases(bad)


def test_every_row_has_paired_differences_per_task_and_layers():
    base = [1, 0, 1, 1, 0, 1]
    other = [1, 1, 0, 1, 1, 1]
    task_of = ["arc_easy"] * 4 + ["piqa"] * 2
    d = paired_delta(base, other, task_of)
    assert d["arc_easy"]["delta"] == pytest.approx(0.0)
    assert d["piqa"] == {"delta": pytest.approx(50.0), "se": pytest.approx(50.0)}
    report = {"num_layers": 30, "methods": {
        "base": {"tasks": {"arc_easy": {"accuracy": 75.0, "layers": 30.0},
                           "in_domain": {"accuracy": 75.0, "layers": 30.0}},
                 "vs_base": paired_delta(base, base, task_of)},
        "routed bias -0.30": {"tasks": {"arc_easy": {"accuracy": 75.0, "layers": 27.5},
                                        "in_domain": {"accuracy": 75.0, "layers": 27.5}},
                              "vs_base": d}}}
    md = table(report)
    row = next(line for line in md.splitlines() if line.startswith("| routed bias -0.30 | 75.0"))
    assert "+0.0 ± 40.8" in row and "27.50" in row
    assert "| routed bias -0.30 | +0.0 ± 40.8 | - | - | +50.0 ± 50.0 |" in md


# ---------------------------------------------------------------- chat check

def test_degenerate_detector_on_known_cases():
    fine = ["Tokyo.", "The capital of Japan is Tokyo.", "7 times 8 is 56.",
            "The answer is 1,000,000.", "Water is H2O, made of hydrogen and oxygen.",
            "Thank you!", "It's a cat - a small, furry pet.", "DNA", "Yes... I think so.",
            "**Answer:** 56", "The freezing point is 0 °C (32 °F), i.e. 273.15 K.",
            "“Merci” means “thank you”.", "2 + 3 = 5", "6 * 7 = 42"]
    for text in fine:
        assert chat_check.degenerate(text) is None, text
    cases = {"": "empty", "  \n ": "empty",
             "Tokyo Tokyo Tokyo": "repetition", "the the the the": "repetition",
             "Paris, Paris, Paris.": "repetition",
             "I think I think I think that": "repetition",
             "The answer is the answer is the answer is": "repetition",
             "!!!!!!!!!!": "repetition", "abababababab": "repetition",
             "?? !! ,, .. --": "punctuation", "#$%& *@ )(": "punctuation",
             "xkcd qwrtp zzgh Tokyo": "non-words", "<|im_start|> <|im_end|> {} ok": "non-words",
             # seen from SmolLM2-135M with a bad schedule
             ". withableaza or withaza ofS. with+S. of).(U. with and“““": "non-words"}
    for text, why in cases.items():
        assert chat_check.degenerate(text) == why, text


def test_chat_check_scoring_on_known_strings():
    assert chat_check.is_correct("The capital of Japan is Tokyo.", ("Tokyo",))
    assert chat_check.is_correct("TOKYO", ("Tokyo",))
    assert not chat_check.is_correct("Kyoto is in Japan.", ("Tokyo",))
    assert chat_check.is_correct("7 x 8 = 56", ("56",))
    assert not chat_check.is_correct("It is 156.", ("56",))  # whole words only
    assert chat_check.is_correct("a thousand, i.e. 1,000", ("1000",))
    assert chat_check.is_correct("Plants take in carbon-dioxide.", ("carbon dioxide", "CO2"))
    assert chat_check.is_correct("Merci means thank you.", ("thank you", "thanks"))
    qs = (("What is the capital of Japan?", ("Tokyo",)), ("What is 7 times 8?", ("56",)))
    row = chat_check.summarise(["Tokyo.", "56 56 56 56"], [27, 30], qs)
    assert row["accuracy"] == 100.0 and row["degenerate"] == 1 and row["layers"] == 28.5
    assert [a["degenerate"] for a in row["answers"]] == [None, "repetition"]
    row = chat_check.summarise(["Kyoto.", "I don't know."], [30, 30], qs)
    assert row["accuracy"] == 0.0 and row["degenerate"] == 0


def test_chat_check_table_pairs_each_method_with_full():
    """By hand: routed loses question 1 and gains question 3 of 4 (differences
    0, -100, 0, +100: mean 0, se = sqrt(20000/3/4) = 40.8); its one
    degenerate answer is one where full's answer read as text."""
    qs = tuple((f"Q{i}?", (a,)) for i, a in enumerate(["Tokyo", "Paris", "Rome", "Berlin"]))
    result = {"full": chat_check.summarise(["Tokyo", "Paris", "Roma", "Bonn"], [30] * 4, qs),
              "routed bias +0.00": chat_check.summarise(
                  ["Tokyo", "Lyon Lyon Lyon Lyon", "Roma", "Berlin"], [28, 27, 29, 30], qs)}
    md = chat_check.table(result)
    assert "| full | 50.0 | 2/4 | +0.0 ± 0.0 | 0 | 0 (0) | 30.00 |" in md
    assert "| routed bias +0.00 | 50.0 | 2/4 | +0.0 ± 40.8 | 2 | 1 (1) | 28.50 |" in md


def test_chat_questions_are_many_and_do_not_give_their_answers():
    qs = chat_check.QUESTIONS
    assert len(qs) >= 40 and len({q for q, _ in qs}) == len(qs)
    for q, accepted in qs:
        assert accepted and not chat_check.is_correct(q, accepted), q


# ---------------------------------------------------------------- through the engine

def test_chat_format_and_chat_check_through_the_engine(dr_llm, oracle):
    """Chat-format choices are routed on the user turn alone (the schedule the
    oracle picks on that span), and the chat check runs full vs routed."""
    from drllm_vllm.pipeline.scoring import Scorer

    scorer = Scorer(dr_llm)
    examples = tasks.load("arc_easy", "eval", 2, "chat") + tasks.load("winogrande", "eval", 1,
                                                                      "chat")
    for r, e in zip(scorer.score([(e, {"drllm_bias": -0.3}) for e in examples]), examples):
        ids, _ = scorer.encoded(e)
        start, end = scorer.route_span(e)
        assert start > 20  # after the system prompt
        _, expected = oracle.forward(ids[0][:end], bias=-0.3, route_start=start)
        assert r.schedule == expected, (e.task, e.doc_id)
    # the bench's accuracy side check scores like the Scorer, on the same subset
    from tests.test_throughput import load_bench

    acc, se = load_bench().accuracy(dr_llm, scorer.tokenizer, 6, {"drllm_bias": -0.3})
    got = scorer.score([(e, {"drllm_bias": -0.3}) for e in tasks.load("arc_easy", "eval", 6)])
    assert acc == sum(r.correct for r in got) / 6
    assert se == pytest.approx((acc * (1 - acc) / 5) ** 0.5)
    qs = chat_check.QUESTIONS[:3]
    result = chat_check.run(dr_llm, [-0.3], max_tokens=8, questions=qs)
    assert set(result) == {"full", "routed bias -0.30"}
    assert result["full"]["layers"] == 30 and result["full"]["n"] == 3
    assert result["full"]["accuracy"] >= 2 / 3 * 100  # Tokyo, Paris, Rome
    assert "| full |" in chat_check.table(result)


def test_shared_prefixes_are_computed_once_and_score_as_without_the_cache(dr_llm):
    """Prefix-first scoring (the shared prefix cached, then the choices read it)
    gives the scores and schedules of scoring every choice from scratch; a
    choice whose scored tokens fell in cached blocks (two continuations that
    share whole blocks, scored a second time) is scored again without them."""
    from drllm_vllm.pipeline.scoring import Scorer

    context = "Notes: " + " ".join(f"item {i} is {i % 7} apples," for i in range(22)) + " So"
    tail = " " + " ".join(f"step {i}, then" for i in range(40))
    e = tasks.Example("synthetic", 0, "q", (context,) * 4,
                      (" seven", " three", tail + " one", tail + " two"), 0, format="zero-shot")
    plain, cached = Scorer(dr_llm), Scorer(dr_llm)
    plain.prefix_block = None
    ids, shared = cached.encoded(e)
    block = cached.prefix_block
    # the shared prefix fills a block; choices 2 and 3 share the blocks after it too
    assert shared >= block and len(ids[2]) - 8 >= (shared // block + 2) * block
    for controls in ({"drllm_mode": "full"}, {"drllm_mode": "routed", "drllm_bias": -0.2}):
        (want,) = plain.score([(e, controls)])
        before, recomputed = cached.cached_tokens, cached.recomputed
        (got,) = cached.score([(e, controls)])
        # choices 0 and 1 read the shared prefix's blocks
        assert cached.cached_tokens - before >= 2 * (shared // block) * block
        cached.memo.clear()  # else the result is known (below)
        (again,) = cached.score([(e, controls)])  # 2 and 3 find each other's blocks
        assert cached.recomputed > recomputed
        for r in (got, again):
            assert r.schedule == want.schedule and r.pred == want.pred
            assert r.scores == pytest.approx(want.scores, abs=1e-4)
    assert 0 < sum(want.schedule) < 30  # the routed schedule skips some layers, not all
    # a question scored under a schedule is not scored again under it, whatever
    # the controls: the routed prefix fixes the schedule, and the result is known
    computed = cached.computed
    (known,) = cached.score([(e, {"drllm_mode": "routed", "drllm_bias": -0.2})])
    (forced,) = cached.score([(e, {"drllm_mode": "schedule", "drllm_schedule": list(want.schedule)})])
    assert cached.computed == computed
    assert known.schedule == forced.schedule == want.schedule
    assert known.scores == forced.scores == again.scores
    (base,) = cached.score([(e, {"drllm_mode": "full"})])
    assert cached.computed == computed + 1 and base.schedule == (1,) * 30


def test_score_log_resumes_and_survives_a_cut_off_append(tmp_path):
    """The eval's score log returns what was logged for the same identity and
    controls only, and a file cut off mid-append keeps its complete lines."""
    from drllm_vllm.pipeline.evaluate import ScoreLog
    from drllm_vllm.pipeline.scoring import Scored

    examples = tasks.load("arc_easy", "eval", 3, seed=0)
    results = [Scored(i % 2, i % 2 == e.gold, (1, 0, 2), 3, -0.5, (-0.5, -0.25, -1.0, -2.0))
               for i, e in enumerate(examples)]
    path, me = tmp_path / "eval.scores.jsonl.gz", {"routers_sha256": "abc", "dtype": "bf16"}
    log = ScoreLog(path, me)
    full, routed = {"drllm_mode": "full"}, {"drllm_mode": "routed", "drllm_bias": -0.3}
    log.add(full, examples[:2], results[:2])
    first = path.stat().st_size
    log.add(routed, examples[2:], results[2:])
    again = ScoreLog(path, me)
    got = again.get(full, examples[1])
    assert got.pred == 1 and got.correct == (examples[1].gold == 1)
    assert got.schedule == (1, 0, 2) and got.layer_applications == 3
    assert got.scores == (-0.5, -0.25, -1.0, -2.0) and got.gold_score == got.scores[examples[1].gold]
    assert again.get(routed, examples[1]) is None and again.get(routed, examples[2]) is not None
    assert ScoreLog(path, {**me, "dtype": "fp32"}).get(full, examples[0]) is None
    # cut the last append off mid-member: the first append's lines survive
    data = path.read_bytes()
    path.write_bytes(data[: first + (len(data) - first) // 2])
    cut = ScoreLog(path, me)
    assert cut.get(full, examples[0]) is not None and cut.get(routed, examples[2]) is None
    cut.add(routed, examples[2:], results[2:])  # rewrites the file whole
    healed = ScoreLog(path, me)
    assert all(healed.get(full, e) for e in examples[:2]) and healed.get(routed, examples[2])
