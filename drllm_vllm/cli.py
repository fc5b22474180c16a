"""The `drllm` command (also `python -m drllm_vllm.cli`)."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_prepare(args) -> None:
    from .checkpoint import prepare

    path = prepare(args.model, args.out)
    print(path)  # last line of stdout: scripts rely on it


def cmd_generate(args) -> None:
    """Run the default Dr.LLM model on prompts and show each schedule."""
    from vllm import LLM, SamplingParams

    from . import schedule_of
    from .checkpoint import prepare
    from .schedule import ACTION_NAMES, layer_applications

    model = args.checkpoint or str(prepare(args.model))
    extra = {"drllm_mode": args.mode, "drllm_bias": args.bias}
    if args.schedule:
        extra["drllm_schedule"] = json.loads(args.schedule)
    llm = LLM(model=model, max_model_len=args.max_model_len, dtype=args.dtype)
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

    from .checkpoint import prepare, validate_checkpoint

    model = Path(args.checkpoint or prepare(args.model))
    config = json.loads((model / "config.json").read_text())
    drllm = validate_checkpoint(model, config)
    state = "trained" if drllm.trained else "UNTRAINED (deterministic init; use full/schedule modes)"
    print(f"drllm serve: model {model}")
    print(f"drllm serve: routers {model / drllm.router_file}: {config['num_hidden_layers']} "
          f"layers, {state}, windows={drllm.num_windows}, repeat allowed at "
          f"{len(drllm.repeat_layers)} layers")
    print("drllm serve: per request: vllm_xargs drllm_mode/drllm_schedule/drllm_bias; "
          "schedule in the response's kv_transfer_params.drllm, GET /drllm/requests/{id}, "
          "GET /drllm/stats, drllm_* on /metrics (settings in force: the 'Dr.LLM "
          "checkpoint' log line)", flush=True)
    env = {**os.environ}
    env.setdefault("VLLM_PLUGINS", "drllm")  # endpoint plugins are opt-in in vLLM
    vllm = str(Path(sys.executable).with_name("vllm"))
    os.execve(vllm, [vllm, "serve", str(model), *args.vllm_args], env)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="drllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="build (or find cached) a Dr.LLM checkpoint")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--out", default=None, help="checkpoint directory (default: cache)")
    p.set_defaults(func=cmd_prepare)

    g = sub.add_parser("generate", help="chat with a Dr.LLM model, print schedules")
    g.add_argument("prompts", nargs="*", default=[
        "What is the capital of France?",
        "Write one sentence about the sea.",
        "What is 7 times 8?",
    ])
    g.add_argument("--model", default="smollm2-135m-instruct")
    g.add_argument("--checkpoint", default=None, help="a Dr.LLM checkpoint directory")
    g.add_argument("--mode", default="routed", choices=["routed", "full", "schedule"])
    g.add_argument("--schedule", default=None, help="JSON list of L actions (0/1/2)")
    g.add_argument("--bias", type=float, default=0.0, help="post-hoc knob in [-1, 1]")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--max-model-len", type=int, default=2048)
    g.add_argument("--dtype", default="bfloat16")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="prepare the default model and serve it "
                       "(OpenAI API); other options go to `vllm serve`")
    s.add_argument("--model", default="smollm2-135m-instruct")
    s.add_argument("--checkpoint", default=None, help="a Dr.LLM checkpoint directory")
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", add_help=False, help="throughput against plain vLLM "
                       "(benchmarks/throughput.py; its options follow)")
    b.set_defaults(func=cmd_bench)

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
