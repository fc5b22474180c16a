"""`drllm eval --chat-check`: does routing keep the model's chat answers?

QUESTIONS are short chat questions with known short answers (geography,
arithmetic, science, language), written for this project. Each is asked as
one user turn with the tokenizer's chat template, greedy, once with every
layer (`drllm_mode="full"`) and once per routed bias. An answer is right
when one of the accepted strings occurs in it as whole words after
`normalise` (case, punctuation, digit grouping). `degenerate` flags answers
that are repetition or mostly non-words / punctuation, the way a broken
layer schedule fails, whether or not the answer string happens to be there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# (question, accepted answers)
QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # geography
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("What is the capital of the United Kingdom?", ("London",)),
    ("What is the capital of Russia?", ("Moscow",)),
    ("What is the capital of Egypt?", ("Cairo",)),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("On which continent is Brazil?", ("South America",)),
    ("Which country has the city of Sydney?", ("Australia",)),
    ("What is the longest river in Africa?", ("Nile",)),
    # arithmetic
    ("What is 2 plus 3?", ("5", "five")),
    ("What is 7 times 8?", ("56", "fifty-six", "fifty six")),
    ("What is 10 minus 4?", ("6", "six")),
    ("What is 9 plus 9?", ("18", "eighteen")),
    ("What is 12 divided by 3?", ("4", "four")),
    ("What is 5 times 5?", ("25", "twenty-five", "twenty five")),
    ("What is 100 minus 1?", ("99", "ninety-nine", "ninety nine")),
    ("What is 6 times 7?", ("42", "forty-two", "forty two")),
    ("How many days are in a week?", ("7", "seven")),
    ("How many minutes are in an hour?", ("60", "sixty")),
    # science
    ("What is the chemical symbol for water?", ("H2O",)),
    ("What planet do we live on?", ("Earth",)),
    ("What is the closest star to the Earth?", ("Sun",)),
    ("What gas do plants absorb from the air?", ("carbon dioxide", "CO2")),
    ("What gas do humans need to breathe to live?", ("oxygen",)),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("At what temperature in degrees Celsius does water freeze?", ("0", "zero")),
    ("How many legs does a spider have?", ("8", "eight")),
    ("What organ pumps blood through the human body?", ("heart",)),
    ("What is the chemical symbol for gold?", ("Au",)),
    # language
    ("What is the opposite of hot?", ("cold",)),
    ("What is the plural of mouse?", ("mice",)),
    ("What is the past tense of the verb go?", ("went",)),
    ("What is the opposite of up?", ("down",)),
    ("Translate the French word 'merci' into English.", ("thank you", "thanks")),
    ("What color do you get by mixing blue and yellow?", ("green",)),
    ("What is the opposite of wet?", ("dry",)),
    ("What animal says 'meow'?", ("cat", "kitten")),
    ("What is the opposite of big?", ("small", "little", "tiny")),
    ("Which day comes after Monday?", ("Tuesday",)),
    ("What do bees make?", ("honey",)),
)


def normalise(text: str) -> str:
    """Lower case, digit grouping removed (1,000 -> 1000), every other run of
    non-alphanumerics one space, padded with a space on each side."""
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text.lower())
    return " " + " ".join(re.sub(r"[^0-9a-z]+", " ", text).split()) + " "


def is_correct(answer: str, accepted: tuple[str, ...]) -> bool:
    """Whether one of the accepted strings occurs in `answer` as whole words
    (after `normalise`: "Tokyo." matches "tokyo", "156" does not match "56")."""
    text = normalise(answer)
    return any(normalise(a) in text for a in accepted)


WORD = re.compile(r"^[^\W_]+(?:['’.,/\-][^\W_]+)*$")  # letters/digits, inner ' . , / -
EDGE = ".,;:!?\"'()[]{}*`“”‘’«»"  # punctuation a word may carry around it
OPERATOR = re.compile(r"^[-+*/=×÷<>≤≥%^]{1,2}$")  # "2 + 3 = 5" reads as text


def _is_word(token: str) -> bool:
    core = token.strip(EDGE)
    if OPERATOR.match(token):
        return True
    if not WORD.match(core) or re.search(r"[a-z][A-Z]", core):  # "ofS": case flips inside
        return False
    # four or more letters without a vowel ("xkcd", "zzgh") is not a word
    return not (core.isalpha() and len(core) >= 4 and not re.search(r"[aeiouy]", core.lower()))


def degenerate(text: str, max_repeats: int = 3, min_word_share: float = 0.7) -> str | None:
    """Why a generated answer is degenerate, or None when it reads as text.

    - "empty": nothing but whitespace;
    - "repetition": an n-gram of 1-4 words repeated `max_repeats` or more times
      in a row ("Tokyo Tokyo Tokyo", "I think I think I think"), or a unit of
      1-8 non-digit characters repeated 5+ times in a row ("!!!!!", "abababab";
      digit runs such as 1000000 are numbers);
    - "punctuation": under half of the non-space characters are letters or
      digits;
    - "non-words": under `min_word_share` of the whitespace-separated tokens
      are words (letters/digits with inner ' . , / or -, surrounding
      punctuation and quotes allowed; no lower-to-upper case flip inside, so
      camel case counts against; four or more letters need a vowel; an
      arithmetic operator such as + or = counts as a word).
    Pure: no model, no state; units of `text` are characters."""
    stripped = "".join(text.split())
    if not stripped:
        return "empty"
    words = [w.strip(EDGE).lower() for w in text.split()]
    words = [w for w in words if w]
    for n in range(1, 5):
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        for i in range(len(grams)):
            run = 1
            while i + run * n < len(grams) and grams[i + run * n] == grams[i]:
                run += 1
            if run >= max_repeats:
                return "repetition"
    if re.search(r"(\D{1,8}?)\1{4,}", stripped):
        return "repetition"
    if sum(c.isalnum() for c in stripped) < 0.5 * len(stripped):
        return "punctuation"
    tokens = text.split()
    if sum(map(_is_word, tokens)) < min_word_share * len(tokens):
        return "non-words"
    return None


def summarise(answers: list[str], layers: list[float],
              questions=QUESTIONS) -> dict:
    """One method's row: accuracy (%), mean layer applications per generated
    token, degenerate count, and per question its answer, correctness and flag."""
    rows = [{"question": q, "accepted": list(a), "answer": text, "correct": is_correct(text, a),
             "degenerate": degenerate(text), "layers": n}
            for (q, a), text, n in zip(questions, answers, layers)]
    return {"accuracy": 100 * sum(r["correct"] for r in rows) / len(rows),
            "layers": sum(layers) / len(layers),
            "degenerate": sum(r["degenerate"] is not None for r in rows),
            "n": len(rows), "answers": rows}


def run(llm, biases, max_tokens: int = 48, questions=QUESTIONS) -> dict:
    """Full and routed (each bias) greedy chat answers, summarised per method.
    {method name: summarise(...)}; layers are per generated token (of L)."""
    from vllm import SamplingParams

    from .. import schedule_of
    from ..schedule import layer_applications

    messages = [[{"role": "user", "content": q}] for q, _ in questions]
    methods = {"full": {"drllm_mode": "full"},
               **{f"routed bias {b:+.2f}": {"drllm_mode": "routed", "drllm_bias": b}
                  for b in biases}}
    out = {}
    for name, controls in methods.items():
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=controls)
        gens = llm.chat(messages, sp, use_tqdm=False)
        out[name] = {"controls": controls, **summarise(
            [g.outputs[0].text.strip() for g in gens],
            [layer_applications(schedule_of(g)) for g in gens], questions)}
    return out


def table(result: dict) -> str:
    """Markdown: per method, accuracy, its paired difference from full (points
    ± one standard error over the same questions), answers changed vs full,
    degenerate answers (and how many of them where full's answer was not),
    mean layers; then the questions some method got wrong."""
    from .evaluate import mean_se

    full = result["full"]["answers"]
    lines = ["| method | accuracy % | right | vs full | changed vs full | degenerate "
             "(full not) | layers |", "|---|---|---|---|---|---|---|"]
    for name, m in result.items():
        pairs = list(zip(m["answers"], full))
        changed = sum(a["answer"] != f["answer"] for a, f in pairs)
        delta, se = mean_se([100 * (int(a["correct"]) - int(f["correct"])) for a, f in pairs])
        new = sum(bool(a["degenerate"]) and not f["degenerate"] for a, f in pairs)
        lines.append(f"| {name} | {m['accuracy']:.1f} | {sum(a['correct'] for a in m['answers'])}"
                     f"/{m['n']} | {delta:+.1f} ± {se:.1f} | {changed} | {m['degenerate']} "
                     f"({new}) | {m['layers']:.2f} |")
    wrong = [i for i in range(len(full))
             if any(not m["answers"][i]["correct"] or m["answers"][i]["degenerate"]
                    for m in result.values())]
    if wrong:
        lines += ["", "Questions some method got wrong or degenerate (answer, flag):", ""]
        for i in wrong:
            lines.append(f"- {full[i]['question']} ({' / '.join(full[i]['accepted'])})")
            for name, m in result.items():
                a = m["answers"][i]
                mark = "right" if a["correct"] else "wrong"
                flag = f", {a['degenerate']}" if a["degenerate"] else ""
                lines.append(f"  - {name}: {mark}{flag}: {a['answer'][:80]!r}")
    return "\n".join(lines)


def main(checkpoint: Path, biases, dtype: str | None = None, out: Path | None = None,
         max_tokens: int = 48, log=print) -> dict:
    """Run the chat check on a checkpoint, print the table, and write JSON to
    `out` only when given."""
    from .evaluate import provenance
    from ..config import default_dtype
    from .scoring import make_engine

    dtype = dtype or default_dtype()
    llm = make_engine(checkpoint, dtype=dtype)
    log(f"chat check: {len(QUESTIONS)} questions, greedy, {max_tokens} tokens, "
        f"full and routed at biases {list(biases)}")
    report = {**provenance(checkpoint), "dtype": dtype, "max_tokens": max_tokens,
              "methods": run(llm, biases, max_tokens)}
    print("\n" + table(report["methods"]) + "\n")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {out}")
    return report
