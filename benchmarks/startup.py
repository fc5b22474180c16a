"""Start-up time of `vllm serve`: plain vLLM (default mode) vs the plugin.

    .venv/bin/python benchmarks/startup.py     # ~8 min on 2 cores

For each engine (plain vLLM on the base weights, the plugin on the Dr.LLM
checkpoint; both default mode, i.e. compiled on CPU) it starts `vllm serve`
twice: first with empty compile caches (a fresh `VLLM_CACHE_ROOT` and
`TORCHINDUCTOR_CACHE_DIR` of its own), then again on the caches the first
start filled. The time is from launching the process to the first answer of
a 4-token greedy completion over HTTP (seconds). Prints a table and writes
JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.throughput import RESULTS, machine, versions  # noqa: E402


def first_answer(model: str, cache: Path, port: int, dtype: str) -> tuple[float, str]:
    """Seconds from `vllm serve` launch to the first completion, and its text."""
    env = dict(os.environ, VLLM_CACHE_ROOT=str(cache / "vllm"),
               TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), VLLM_PLUGINS="drllm")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    vllm = Path(sys.executable).with_name("vllm")
    body = json.dumps({"model": model, "prompt": "The capital of France is",
                       "max_tokens": 4, "temperature": 0}).encode()
    t0 = time.perf_counter()
    with open(cache.with_suffix(".log"), "a") as log:
        proc = subprocess.Popen([str(vllm), "serve", model, "--port", str(port),
                                 "--max-model-len", "512", "--dtype", dtype],
                                env=env, stdout=log, stderr=log)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"vllm serve exited with {proc.returncode}; see {cache}.log")
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
            try:
                answer = json.load(urllib.request.urlopen(req, timeout=120))
                return time.perf_counter() - t0, answer["choices"][0]["text"]
            except OSError:
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait()


def main(argv=None) -> dict:
    from drllm_vllm.checkpoint import cache_dir, prepare
    from drllm_vllm.config import default_dtype

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--dtype", default=None, help="default: as `drllm serve` picks")
    p.add_argument("--results-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    dtype = args.dtype or default_dtype()
    checkpoint = prepare()
    engines = {"plain default": str(cache_dir() / "base" / checkpoint.name.removesuffix("-drllm")),
               "plugin": str(checkpoint)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="drllm_startup_") as tmp:
        for name, model in engines.items():
            cache = Path(tmp) / name.replace(" ", "_")
            for caches in ("empty", "filled"):
                seconds, text = first_answer(model, cache, args.port, dtype)
                rows.append({"engine": name, "compile_caches": caches,
                             "seconds_to_first_answer": round(seconds, 1), "answer": text})
                print(f"{name:14s} caches {caches:7s} {seconds:6.1f} s  {text!r}", flush=True)
    by = {(r["engine"], r["compile_caches"]): r["seconds_to_first_answer"] for r in rows}
    ratios = {c: round(by[("plugin", c)] / by[("plain default", c)], 2) for c in ("empty", "filled")}
    print(f"plugin / plain default: {ratios['empty']}x (empty caches), "
          f"{ratios['filled']}x (filled caches)")
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "versions": versions(), "dtype": dtype,
              "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "rows": rows, "plugin_over_plain": ratios}
    out = Path(args.results_dir) / f"startup_{datetime.now():%Y%m%d_%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
