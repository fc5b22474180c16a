"""The `drllm` command (also `python -m drllm_vllm.cli`)."""

from __future__ import annotations

import argparse
import json
import sys

DTYPE_HELP = "default: bfloat16 where the CPU computes it natively, else float32"
CHECKPOINT_HELP = ("any Dr.LLM checkpoint directory (instead of --model); results and "
                   "routers are filed under its name, the folder's less -drllm")


def cmd_prepare(args) -> None:
    from .checkpoint import prepare, prepare_base, prepare_gguf

    if args.base:
        path = prepare_base(args.base, args.out, args.allow, args.routers)
    elif args.gguf:
        path = prepare_gguf(args.gguf, args.out, args.allow, args.routers)
    else:
        path = prepare(args.model, args.out, args.allow, args.routers)
    print(path)  # last line of stdout: scripts rely on it


def checkpoint_of(args, allow: str = "derived") -> tuple["Path", str]:
    """(checkpoint, name): --checkpoint, checked, else the built-in --model
    prepared with `allow`. `name` files results and routers: the model's, or
    the checkpoint folder's less a -drllm suffix (`checkpoint.checkpoint_name`)."""
    from pathlib import Path

    from .checkpoint import checkpoint_name, prepare, validate_checkpoint

    if not args.checkpoint:
        return prepare(args.model, allow=allow), args.model
    path = Path(args.checkpoint)
    if not (path / "config.json").is_file():
        raise ValueError(f"--checkpoint {path} is not a checkpoint folder (no config.json); "
                         f"build one with `drllm prepare`")
    validate_checkpoint(path, json.loads((path / "config.json").read_text()))
    return path, checkpoint_name(path)


def cmd_generate(args) -> None:
    """Run the default Dr.LLM model on prompts and show each schedule."""
    from vllm import LLM, SamplingParams

    from . import schedule_of
    from .schedule import ACTION_NAMES, layer_applications

    model = str(checkpoint_of(args)[0])
    extra = {"drllm_mode": args.mode, "drllm_bias": args.bias}
    if args.schedule:
        extra["drllm_schedule"] = json.loads(args.schedule)
    from .config import default_dtype

    llm = LLM(model=model, max_model_len=args.max_model_len, dtype=args.dtype or default_dtype())
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, extra_args=extra)
    messages = [[{"role": "user", "content": p}] for p in args.prompts]
    for prompt, out in zip(args.prompts, llm.chat(messages, sampling, use_tqdm=False)):
        schedule = schedule_of(out)
        counts = {n: schedule.count(a) for a, n in enumerate(ACTION_NAMES)}
        print(f"\n>>> {prompt}\n{out.outputs[0].text.strip()}")
        print(f"schedule {''.join(map(str, schedule))}  {counts}  "
              f"{layer_applications(schedule)}/{len(schedule)} layer applications per token")


def cmd_serve(args) -> None:
    """Prepare the default model (or take --checkpoint) and run `vllm serve` on it."""
    import os
    from pathlib import Path

    from .checkpoint import validate_checkpoint

    model = Path(checkpoint_of(args)[0])
    config = json.loads((model / "config.json").read_text())
    drllm = validate_checkpoint(model, config)
    state = "trained" if drllm.trained else "UNTRAINED (deterministic init; use full/schedule modes)"
    print(f"drllm serve: model {model}")
    print(f"drllm serve: routers {model / drllm.router_file}: {config['num_hidden_layers']} "
          f"layers, {state}, windows={drllm.num_windows}, skip allowed at "
          f"{'every layer' if drllm.skip_layers is None else list(drllm.skip_layers)}, "
          f"repeat allowed at {list(drllm.repeat_layers) or 'no layer'}")
    print("drllm serve: per request: vllm_xargs drllm_mode/drllm_schedule/drllm_bias; "
          "schedule in the response's kv_transfer_params.drllm, GET /drllm/requests/{id}, "
          "GET /drllm/stats, drllm_* on /metrics (settings in force: the 'Dr.LLM "
          "checkpoint' log line)", flush=True)
    vllm_args = list(args.vllm_args)
    if not any(a == "--dtype" or a.startswith("--dtype=") for a in vllm_args):
        from .config import default_dtype

        vllm_args += ["--dtype", default_dtype()]
        print(f"drllm serve: --dtype {vllm_args[-1]} ({DTYPE_HELP}; pass --dtype to choose)")
    env = {**os.environ}
    env.setdefault("VLLM_PLUGINS", "drllm")  # endpoint plugins are opt-in in vLLM
    vllm = str(Path(sys.executable).with_name("vllm"))
    os.execve(vllm, [vllm, "serve", str(model), *vllm_args], env)


def cmd_bench(args) -> None:
    """benchmarks/throughput.py with the remaining options (`drllm bench -h`)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"
    if not path.is_file():
        raise ValueError(f"{path} not found: `drllm bench` needs the source checkout")
    spec = importlib.util.spec_from_file_location("drllm_bench", path)
    bench = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if bench.main(args.vllm_args)["errors"]:
        sys.exit(1)

def _model_dir(name: str) -> "Path":
    from .checkpoint import ROUTER_WEIGHTS_DIR

    return ROUTER_WEIGHTS_DIR / name


def cmd_search(args) -> None:
    """MCTS over layer paths on the search splits, scored by the engine (resumable)."""
    from pathlib import Path

    from .checkpoint import all_layers
    from .pipeline.mcts import MCTSConfig
    from .pipeline.scoring import Scorer, make_engine
    from .pipeline.search import run_search, speed_comparison

    # the search tries every action at every layer: a checkpoint that allows
    # them all (for --checkpoint, its -drllm-all-layers sibling)
    checkpoint, name = checkpoint_of(args, allow="all")
    checkpoint = all_layers(checkpoint)
    scorer = Scorer(make_engine(checkpoint, dtype=args.dtype))
    if args.compare_speed:
        speed_comparison(scorer, checkpoint, args.compare_speed, Path(args.speed_out))
        return
    if args.rescore_labels:
        from .pipeline.labels import SCORES_FILE, rescore
        from .pipeline.search import load_records

        files = _search_paths(name, None)
        rescore(scorer, load_records(files), _model_dir(name) / SCORES_FILE)
        return
    file = "search.jsonl" if args.format is None else f"search_{args.format}.jsonl"
    out = Path(args.out or _model_dir(name) / file)
    run_search(scorer, out, args.tasks.split(","), args.limit,
               MCTSConfig(simulations=args.simulations), pool=args.pool, seed=args.seed,
               tolerance=args.tolerance, format=args.format)


def cmd_train(args) -> None:
    """Train routers on the search labels and write them with their card."""
    from pathlib import Path

    from .pipeline.train import TrainConfig, train_and_ship

    from .pipeline.labels import LabelFilter

    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed,
                      patience=args.patience or None)
    label_filter = (None if args.label_filter == "none"
                    else LabelFilter(min_margin=args.min_margin, tolerance=args.tolerance))
    checkpoint, name = checkpoint_of(args)
    train_and_ship(checkpoint, name, _search_paths(name, args.search),
                   Path(args.out or _model_dir(name)), cfg, label_filter)


def _search_paths(name: str, names: str | None) -> list:
    """--search FILE[,FILE] (a bare name is looked up beside the routers), or
    every search*.jsonl of the model `name`."""
    from pathlib import Path

    from .pipeline.search import search_files

    if names is None:
        files = search_files(_model_dir(name))
    else:
        files = [Path(n) if Path(n).exists() or "/" in n else _model_dir(name) / n
                 for n in names.split(",")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise ValueError(f"search files {missing or 'search*.jsonl'} not found (in "
                         f"{_model_dir(name)}); run `drllm search` or name them with --search")
    return files


def cmd_eval(args) -> None:
    """Base vs routed (bias curve) vs static pruning on the test splits, or
    with --chat-check, full vs routed chat answers to known questions."""
    from pathlib import Path

    from .pipeline.evaluate import parse_biases

    biases = parse_biases(args.biases)
    if args.save and not args.chat_check:
        raise ValueError("--save is for --chat-check; the evaluation always writes "
                         f"{args.out or 'benchmarks/results/eval_<name>'}.json/.md and its plots")
    checkpoint, name = checkpoint_of(args)
    stem = args.out or f"benchmarks/results/eval_{name}"
    if args.chat_check:
        from .pipeline.chat_check import main as chat_check

        out = Path(stem + "_chat_check.json") if args.save else None
        chat_check(checkpoint, biases, args.dtype, out)
        return
    from .pipeline.evaluate import main as run

    run(checkpoint, name, args.limit_in, args.limit_out, biases, args.generation,
        Path(stem), args.dtype, args.format, args.seed, args.static, record_card=args.card)


def main(argv: list[str] | None = None) -> None:
    from .pipeline.tasks import FORMATS

    parser = argparse.ArgumentParser(prog="drllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="build (or find cached) a Dr.LLM checkpoint")
    base = p.add_mutually_exclusive_group()
    base.add_argument("--model", default="smollm2-135m-instruct", help="a built-in model")
    base.add_argument("--base", default=None, metavar="DIR", help="instead: any local "
                      "Hugging Face causal LM (Llama, Qwen2, Qwen3; config.json, "
                      "safetensors, tokenizer)")
    base.add_argument("--gguf", default=None, metavar="FILE", help="instead: a GGUF file "
                      "(Llama, Qwen2, Qwen3), de-quantized to fp32 with transformers")
    p.add_argument("--routers", default=None, metavar="FILE|DIR",
                   help="a routers.safetensors, or a folder with it and card.json as "
                   "`drllm train` writes (default: the shipped ones for --model, else "
                   "fresh routers marked untrained)")
    p.add_argument("--out", default=None, help="checkpoint directory (default: "
                   "<cache>/checkpoints/<name>-drllm, name = model, folder or GGUF stem)")
    p.add_argument("--allow", default="derived", choices=["derived", "all"],
                   help="derived (default): routers skip and repeat only at the layers "
                   "the search labels allow; all: every layer may skip and repeat (what "
                   "`drllm search` uses; a separate cached checkpoint)")
    p.set_defaults(func=cmd_prepare)

    g = sub.add_parser("generate", help="chat with a Dr.LLM model, print schedules")
    g.add_argument("prompts", nargs="*", default=[
        "What is the capital of France?",
        "Write one sentence about the sea.",
        "What is 7 times 8?",
    ])
    g.add_argument("--model", default="smollm2-135m-instruct")
    g.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    g.add_argument("--mode", default="routed", choices=["routed", "full", "schedule"])
    g.add_argument("--schedule", default=None, help="JSON list of L actions (0/1/2)")
    g.add_argument("--bias", type=float, default=0.0, help="post-hoc knob in [-1, 1]")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--max-model-len", type=int, default=2048)
    g.add_argument("--dtype", default=None, help=DTYPE_HELP)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="prepare the default model and serve it "
                       "(OpenAI API); other options go to `vllm serve`",
                       description="Prepare the default model (or take --checkpoint) and "
                       "run `vllm serve` on it. Every option not listed here goes to "
                       "`vllm serve` as given, e.g. --port 8001 --gpu-memory-utilization 0.3.")
    s.add_argument("--model", default="smollm2-135m-instruct")
    s.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", add_help=False, help="throughput against plain vLLM "
                       "(benchmarks/throughput.py; its options follow)")
    b.set_defaults(func=cmd_bench)

    m = sub.add_parser("search", help="MCTS supervision: layer paths scored by the engine")
    m.add_argument("--model", default="smollm2-135m-instruct")
    m.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    m.add_argument("--tasks", default="arc_easy,arc_challenge,arithmetic")
    m.add_argument("--limit", type=int, default=None, help="examples in all (default: all)")
    m.add_argument("--simulations", type=int, default=50)
    m.add_argument("--pool", type=int, default=32, help="examples searched in lock-step")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--tolerance", type=float, default=0.05,
                   help="max drop of the gold's log-prob per character for a reward")
    m.add_argument("--dtype", default=None, help=DTYPE_HELP)
    m.add_argument("--format", default=None, choices=FORMATS,
                   help="prompt format (default: each task's own, as the shipped routers)")
    m.add_argument("--out", default=None, help="JSONL (default router_weights/<name>/"
                   "search.jsonl, or search_<format>.jsonl with --format)")
    m.add_argument("--compare-speed", type=int, default=0, metavar="N",
                   help="instead: paths/s, engine batches vs reference one at a time, N examples")
    m.add_argument("--speed-out", default="benchmarks/results/search_speed.json")
    m.add_argument("--rescore-labels", action="store_true",
                   help="score every label path of the search files, and the full model, for "
                   "the label filter (router_weights/<model>/label_scores.jsonl; resumable)")
    m.set_defaults(func=cmd_search)

    t = sub.add_parser("train", help="train routers on search labels (focal loss)")
    t.add_argument("--model", default="smollm2-135m-instruct")
    t.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    t.add_argument("--search", default=None, help="search JSONL files, comma-separated "
                   "(default: every router_weights/<name>/search*.jsonl)")
    t.add_argument("--label-filter", default="margin", choices=["margin", "none"],
                   help="margin: train only on robust labels (labels.robust; needs "
                   "`drllm search --rescore-labels`); none: every label")
    t.add_argument("--min-margin", type=float, default=0.05,
                   help="gold over best wrong choice under the path, nats per character")
    t.add_argument("--tolerance", type=float, default=0.05,
                   help="largest drop of that margin versus the full model")
    t.add_argument("--patience", type=int, default=5,
                   help="stop after this many epochs without a better val F1 (0: never)")
    t.add_argument("--out", default=None, help="directory (default router_weights/<name>)")
    t.add_argument("--epochs", type=int, default=25)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="base vs routed vs static pruning on the test splits")
    e.add_argument("--model", default="smollm2-135m-instruct")
    e.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    e.add_argument("--limit-in", type=int, default=200,
                   help="examples per in-domain task (a seeded random subset; a number at "
                   "least the set's size takes all of it)")
    e.add_argument("--limit-out", type=int, default=100,
                   help="per out-of-domain task (MMLU stratified by subject)")
    e.add_argument("--biases", default="-0.6,-0.3,0,0.3",
                   help="comma-separated numbers in [-1, 1], or 'sweep' (-1 to 1 by 0.1)")
    e.add_argument("--generation", type=int, default=50, help="GSM8K/MATH base examples")
    e.add_argument("--format", default=None, choices=FORMATS,
                   help="prompt format of every task (default: as searched and trained, "
                   "zero-shot except five-shot arithmetic)")
    e.add_argument("--seed", type=int, default=0, help="seed of the random subsets")
    e.add_argument("--no-static", dest="static", action="store_false",
                   help="leave out the static pruning rows (e.g. to compare two routers)")
    e.add_argument("--chat-check", action="store_true",
                   help="instead: full vs routed (each of --biases) greedy chat answers to "
                   "known questions; accuracy, degenerate answers, layers")
    e.add_argument("--save", action="store_true",
                   help="with --chat-check: write <--out>_chat_check.json")
    e.add_argument("--card", action="store_true",
                   help="record the table in the shipped routers' card "
                   "(router_weights/<model>/card.json) when they are the routers evaluated")
    e.add_argument("--dtype", default=None, help=DTYPE_HELP)
    e.add_argument("--out", default=None,
                   help="results file stem (default benchmarks/results/eval_<name>); scores "
                   "are logged as they are made in <out>.scores.jsonl.gz, and a run with "
                   "the same --out resumes from that log")
    e.set_defaults(func=cmd_eval)

    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("serve", "bench"):  # those pass the rest on
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.vllm_args = rest
    try:
        args.func(args)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"drllm: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
