"""One data-parallel rank, started by torchrun (tests/test_parallel.py).

vLLM 0.32 runs offline data parallelism for dense models only with
torchrun's external launcher: every process builds its own engine with
`data_parallel_size=WORLD_SIZE, distributed_executor_backend="external_launcher"`,
and the engines step in lock-step (an idle rank runs dummy batches).
Rank r runs requests r, r + WORLD_SIZE, ... of the spec and writes
{index: [tokens, schedule]} to <out>/rank<r>.json.

    torchrun --standalone --nproc-per-node 2 tests/data_parallel_rank.py spec.json out/
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(spec_path: str, out_dir: str) -> None:
    from vllm import LLM, SamplingParams

    from drllm_vllm import schedule_of

    spec = json.loads(Path(spec_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    llm = LLM(model=spec["checkpoint"], dtype="float32", max_model_len=spec["max_model_len"],
              seed=0, enforce_eager=spec["enforce_eager"],
              data_parallel_size=world, distributed_executor_backend="external_launcher")
    mine = list(range(rank, len(spec["requests"]), world))
    requests = [spec["requests"][i] for i in mine]
    outs = llm.generate(
        [{"prompt_token_ids": r["prompt_ids"]} for r in requests],
        [SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, extra_args=r["extra_args"])
         for r in requests],
        use_tqdm=False,
    )
    results = {i: [list(o.outputs[0].token_ids), schedule_of(o)] for i, o in zip(mine, outs)}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
