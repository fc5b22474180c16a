"""Benchmark of drllm_vllm.kernels: router logits and row dispatch against torch.

    python benchmarks/kernels.py            # GPU: the full grid (a few minutes)
    python benchmarks/kernels.py --quick    # small shapes (CPU: torch only)

For each model width d and (sequences S, tokens T) the fused Triton router
(hidden + residual in bf16, W = 8, one router) is timed against the torch
reference run eagerly and under torch.compile. GB/s counts the bytes of
hidden and residual read once; "of copy" divides that by the bandwidth of a
large device-to-device copy measured in the same run (bytes read + written),
so it is a lower bound for the pooling part (the MLP stages are included).
"Routing / prefill" is the time of all L routers of a model of that width
against one prefill forward of a random-weight LlamaConfig model. Results: a
table on stdout, JSON + markdown (+ PNG) under benchmarks/results/.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

try:
    from drllm_vllm import kernels as K
except ImportError:  # not installed (a bare GPU machine): the source tree
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import kernels as K

from tqdm import tqdm

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WINDOWS = 8
# widths of real models and their depth / shape (LlamaConfig stand-ins)
MODELS = {
    576: dict(name="SmolLM-135M", layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152),
    896: dict(name="Qwen2.5-0.5B", layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936),
    2048: dict(name="Llama-3.2-1B", layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256),
    4096: dict(name="Llama-3.1-8B", layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
}
FULL_SHAPES = [(1, 128), (1, 1024), (1, 8192), (1, 32768), (8, 2048), (64, 128), (64, 512)]
QUICK_SHAPES = [(1, 128), (1, 1024), (8, 256)]


def timer(device: torch.device):
    """Median milliseconds of fn(): CUDA events via do_bench, else a host clock."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn, rep=100: triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")

    def cpu_time(fn, rep=100):
        fn()
        times, deadline = [], time.perf_counter() + rep / 1000
        while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_time


def copy_bandwidth(device, bench) -> float:
    """GB/s of a large copy, counting bytes read and written."""
    n = (1 << 29) if device.type == "cuda" else (1 << 26)
    x = torch.randn(n // 2, device=device).view(torch.bfloat16)[:n].contiguous()
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / ms / 1e6


def router_inputs(num_seqs, length, d, device, layers=1, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    n = num_seqs * length
    hidden = torch.randn(n, d, device=device, generator=gen, dtype=torch.bfloat16)
    residual = torch.randn(n, d, device=device, generator=gen, dtype=torch.bfloat16)
    starts = torch.arange(num_seqs, device=device) * length
    lengths = torch.full((num_seqs,), length, device=device)
    weights = []
    for _ in range(layers):
        w1 = torch.randn(128, d, device=device, generator=gen) / d**0.5
        b1 = 0.1 * torch.randn(128, device=device, generator=gen)
        w2 = torch.randn(3, 128, device=device, generator=gen) / 128**0.5
        b2 = 0.1 * torch.randn(3, device=device, generator=gen)
        weights.append((w1, b1, w2, b2))
    return hidden, residual, starts, lengths, weights


def graph_timer(device, bench):
    """Median ms of fn() replayed from a CUDA graph: device time, no launch overhead."""
    if device.type != "cuda":
        return None

    def graph_ms(fn, rep=100):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench(graph.replay, rep=rep)

    return graph_ms


def host_us(fn, device, calls=50):
    """Host microseconds per call, back to back (the launch cost)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
    return elapsed / calls * 1e6


def bench_router(dims, shapes, device, bench, copy_gbs):
    use_triton = device.type == "cuda" and K.HAS_TRITON
    graph_ms = graph_timer(device, bench)
    rows = []
    for d in dims:
        for num_seqs, length in tqdm(shapes, desc=f"router d={d}", leave=False):
            hidden, residual, starts, lengths, weights = router_inputs(num_seqs, length, d, device)
            args = (hidden, starts, lengths, WINDOWS, *weights[0], residual)
            nbytes = 2 * hidden.numel() * hidden.element_size()
            row = dict(d=d, seqs=num_seqs, tokens=length, mbytes=nbytes / 1e6)
            ref = K.route_logits_ref(*args)
            row["eager_ms"] = bench(lambda: K.route_logits_ref(*args))
            if use_triton:
                def triton_call():
                    return K.route_logits_triton(*args, max_length=length)

                out = triton_call()
                err = ((out[0] - ref[0]).norm() / ref[0].norm()).item()
                assert err < 1e-3, f"Triton differs from the reference: {err:.2e} at {row}"
                row["triton_ms"] = bench(triton_call)
                row["graph_ms"] = graph_ms(triton_call)
                row["host_us"] = host_us(triton_call, device)
                row["gbs"] = nbytes / row["graph_ms"] / 1e6
                row["vs_eager"] = row["eager_ms"] / row["triton_ms"]
            else:
                row["gbs"] = nbytes / row["eager_ms"] / 1e6
            row["of_copy"] = row["gbs"] / copy_gbs
            rows.append(row)
            del hidden, residual, args
    return rows


def bench_router_compiled(rows, device, bench):
    """torch.compile of the reference, run last: it slows later Triton launches (see host_us)."""
    compiled = torch.compile(K.route_logits_ref, dynamic=True)
    for row in tqdm(rows, desc="torch.compile", leave=False):
        hidden, residual, starts, lengths, weights = router_inputs(row["seqs"], row["tokens"], row["d"], device)
        args = (hidden, starts, lengths, WINDOWS, *weights[0], residual)
        compiled(*args)
        row["compile_ms"] = bench(lambda: compiled(*args))
        if "triton_ms" in row:
            row["vs_compile"] = row["compile_ms"] / row["triton_ms"]
    if device.type == "cuda" and K.HAS_TRITON:  # the same launch as the first row, after compiling
        first = rows[0]
        hidden, residual, starts, lengths, weights = router_inputs(first["seqs"], first["tokens"], first["d"], device)
        args = (hidden, starts, lengths, WINDOWS, *weights[0], residual)
        first["host_us_after_compile"] = host_us(
            lambda: K.route_logits_triton(*args, max_length=first["tokens"]), device)


def build_model(d, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = MODELS[d]
    config = LlamaConfig(
        hidden_size=d, num_hidden_layers=m["layers"], num_attention_heads=m["heads"],
        num_key_value_heads=m["kv_heads"], intermediate_size=m["intermediate"],
        vocab_size=m["vocab"], max_position_embeddings=65536, tie_word_embeddings=True,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.to(torch.bfloat16).eval()


def bench_prefill_share(dims, lengths, device, bench):
    """All L routers (one sequence of T tokens) against one prefill forward."""
    use_triton = device.type == "cuda" and K.HAS_TRITON
    route = K.route_logits_triton if use_triton else K.route_logits_ref
    rows = []
    for d in dims:
        model = build_model(d, device)
        layers = MODELS[d]["layers"]
        for length in tqdm(lengths, desc=f"prefill d={d}", leave=False):
            hidden, residual, starts, lens, weights = router_inputs(1, length, d, device, layers)
            ids = torch.randint(0, MODELS[d]["vocab"], (1, length), device=device)

            def all_routers():
                for w in weights:
                    route(hidden, starts, lens, WINDOWS, *w, residual,
                          **({"max_length": length} if use_triton else {}))

            with torch.inference_mode():
                prefill_ms = bench(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), rep=200)
                routing_ms = bench(all_routers)
                graph_ms = graph_timer(device, bench)
                routing_graph_ms = graph_ms(all_routers) if use_triton else None
            rows.append(dict(d=d, model=MODELS[d]["name"] + "-like", layers=layers, tokens=length,
                             prefill_ms=prefill_ms, routing_ms=routing_ms, routing_graph_ms=routing_graph_ms,
                             share=routing_ms / prefill_ms,
                             graph_share=routing_graph_ms / prefill_ms if routing_graph_ms else None,
                             impl="triton" if use_triton else "torch"))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_dispatch(device, bench, quick):
    use_triton = device.type == "cuda" and K.HAS_TRITON
    rows = []
    for d in ([576] if quick else [576, 4096]):
        for num_rows in ([256, 4096] if quick else [256, 4096, 32768]):
            x = torch.randn(2 * num_rows, d, device=device, dtype=torch.bfloat16)
            idx = torch.randperm(2 * num_rows, device=device)[:num_rows].sort().values
            src = torch.randn(num_rows, d, device=device, dtype=torch.bfloat16)
            nbytes = 2 * num_rows * d * x.element_size()
            row = dict(d=d, rows=num_rows, mbytes=nbytes / 1e6)
            row["gather_torch_ms"] = bench(lambda: K.gather_rows_ref(x, idx))
            row["scatter_torch_ms"] = bench(lambda: K.scatter_rows_ref_(x, idx, src))
            if use_triton:
                assert torch.equal(K.gather_rows_triton(x, idx), K.gather_rows_ref(x, idx))
                row["gather_triton_ms"] = bench(lambda: K.gather_rows_triton(x, idx))
                row["scatter_triton_ms"] = bench(lambda: K.scatter_rows_triton_(x, idx, src))
            rows.append(row)
    return rows


TUNE_SHAPES = [(1, 32768, 4096), (1, 32768, 576), (8, 2048, 4096), (64, 512, 2048), (1, 4096, 2048),
               (1, 1024, 896), (64, 128, 576), (1, 128, 4096), (4, 512, 576)]


def bench_tune(device, bench):
    """Sweep of the Triton router's launch configuration (sets router_pool's defaults)."""
    rp = sys.modules[K.route_logits_triton.__module__]
    graph_ms = graph_timer(device, bench)
    variants = {"default": {}}
    for pps in (4, 8, 16):
        for bt in (32, 64):
            for bd in (64, 128, 256):
                for nw in (4, 8):
                    variants[f"pps={pps} bt={bt} bd={bd} w={nw}"] = dict(
                        programs_per_sm=pps, block_t=bt, block_d=bd, num_warps=nw)
    for cols in (128, 256, 1024, 1 << 16):
        variants[f"cols/split={cols}"] = dict(cols_per_split=cols)
    rows = []
    for num_seqs, length, d in tqdm(TUNE_SHAPES, desc="tune"):
        hidden, residual, starts, lengths, weights = router_inputs(num_seqs, length, d, device)
        args = (hidden, starts, lengths, WINDOWS, *weights[0], residual)
        nbytes = 2 * hidden.numel() * hidden.element_size()
        for name, over in variants.items():
            cfg = rp.choose_config(num_seqs, length, d, WINDOWS, 2, device, **over)
            ms = graph_ms(lambda: K.route_logits_triton(*args, max_length=length, config=cfg), rep=50)
            rows.append(dict(seqs=num_seqs, tokens=length, d=d, variant=name, ms=ms, gbs=nbytes / ms / 1e6,
                             config=repr(cfg)))
        if (num_seqs, length, d) == TUNE_SHAPES[-1]:  # where the host's time goes, for one call
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.runcall(lambda: [K.route_logits_triton(*args, max_length=length) for _ in range(200)])
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)
        mine = [r for r in rows if (r["seqs"], r["tokens"], r["d"]) == (num_seqs, length, d)]
        best = min(mine, key=lambda r: r["ms"])
        default = mine[0]
        print(f"S={num_seqs} T={length} d={d}: default {default['ms']:.4f} ms ({default['gbs']:.0f} GB/s) "
              f"{default['config']}; "
              f"best {best['variant']} {best['ms']:.4f} ms ({best['gbs']:.0f} GB/s)")
    return rows


def fmt(v, spec=".3f"):
    return "n/a" if v is None else format(v, spec)


def router_table(rows):
    head = ("| d | S | T | MB read | triton ms | graph ms | host us | eager ms | compile ms "
            "| GB/s | of copy | x eager | x compile |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(
            f"| {r['d']} | {r['seqs']} | {r['tokens']} | {r['mbytes']:.1f} | {fmt(r.get('triton_ms'))} "
            f"| {fmt(r.get('graph_ms'))} | {fmt(r.get('host_us'), '.0f')} "
            f"| {fmt(r['eager_ms'])} | {fmt(r.get('compile_ms'))} | {r['gbs']:.0f} | {r['of_copy']:.0%} "
            f"| {fmt(r.get('vs_eager'), '.1f')} | {fmt(r.get('vs_compile'), '.1f')} |")
    return lines


def prefill_table(rows):
    lines = ["| model | L | T | prefill ms | all routers ms | graph ms | routing / prefill | graph / prefill "
             "| routers |", "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['model']} (d={r['d']}) | {r['layers']} | {r['tokens']} | {r['prefill_ms']:.2f} "
                     f"| {r['routing_ms']:.3f} | {fmt(r.get('routing_graph_ms'))} | {r['share']:.2%} "
                     f"| {fmt(r.get('graph_share'), '.2%')} | {r['impl']} |")
    return lines


def dispatch_table(rows):
    lines = ["| d | rows | MB moved | gather torch ms | gather triton ms | scatter torch ms | scatter triton ms |",
             "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['d']} | {r['rows']} | {r['mbytes']:.1f} | {fmt(r['gather_torch_ms'], '.4f')} "
                     f"| {fmt(r.get('gather_triton_ms'), '.4f')} | {fmt(r['scatter_torch_ms'], '.4f')} "
                     f"| {fmt(r.get('scatter_triton_ms'), '.4f')} |")
    return lines


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for d in sorted({r["d"] for r in rows}):
        pts = sorted((r["seqs"] * r["tokens"], r["gbs"]) for r in rows if r["d"] == d and r["seqs"] == 1)
        ax.plot(*zip(*pts), marker="o", label=f"d={d}, S=1")
    copy = rows[0]["gbs"] / rows[0]["of_copy"]
    ax.axhline(copy, color="grey", ls="--", label="device copy (read+write)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("GB/s (hidden + residual read)")
    ax.set_title("Fused router pooling + MLP")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--no-prefill", action="store_true", help="skip the routing / prefill comparison")
    parser.add_argument("--out-dir", default=RESULTS)
    parser.add_argument("--tag", default=None, help="file name suffix (default: the device)")
    parser.add_argument("--tune", action="store_true", help="only sweep the Triton launch configuration")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bench = timer(device)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device_name, host=platform.node(), cpu_count=os.cpu_count(),
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        python=platform.python_version(), torch=torch.__version__, triton=triton_version,
        windows=WINDOWS, dtype="bfloat16 hidden + residual, fp32 router weights",
    )
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count())
    tag = args.tag or device_name.lower().replace(" ", "_").replace("/", "_")
    os.makedirs(args.out_dir, exist_ok=True)
    copy_gbs = copy_bandwidth(device, bench)
    meta["copy_gbs"] = copy_gbs
    print(f"{device_name}: device copy {copy_gbs:.0f} GB/s (read + write)")
    if args.tune:
        tune = bench_tune(device, bench)
        with open(os.path.join(args.out_dir, f"kernels_tune_{tag}.json"), "w") as f:
            json.dump(dict(meta=meta, tune=tune), f, indent=1)
        return

    dims = [576, 896] if args.quick else sorted(MODELS)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    router = bench_router(dims, shapes, device, bench, copy_gbs)
    prefill = []
    if not args.no_prefill:
        prefill = bench_prefill_share([576] if args.quick else dims,
                                      [128] if args.quick else [512, 4096], device, bench)
    dispatch = bench_dispatch(device, bench, args.quick)
    if not args.no_compile:
        bench_router_compiled(router, device, bench)

    lines = [f"# Kernel benchmark: {device_name}", "",
             f"{meta['date']}, `{meta['command']}`, torch {meta['torch']}, triton {meta['triton']}, "
             f"python {meta['python']}. Device copy: {copy_gbs:.0f} GB/s (read + write).", "",
             "## Router logits (W=8, bf16 hidden + residual)", "",
             "triton ms: launched from Python (do_bench median); graph ms: the same calls replayed from a "
             "CUDA graph (device time); host us: Python time per call; GB/s and of copy from graph ms; "
             "speed-ups from triton ms against the reference run eagerly / under torch.compile.", "",
             *router_table(router)]
    if router and "host_us_after_compile" in router[0]:
        lines += ["", f"Host time per Triton call after torch.compile ran in the process: "
                      f"{router[0]['host_us_after_compile']:.0f} us (before: {router[0]['host_us']:.0f} us)."]
    if prefill:
        lines += ["", "## All routers of a model against one prefill forward", "", *prefill_table(prefill)]
    lines += ["", "## Row dispatch (bf16)", "", *dispatch_table(dispatch)]
    print("\n".join(lines[2:]))

    stem = os.path.join(args.out_dir, f"kernels_{tag}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, router=router, prefill=prefill, dispatch=dispatch), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    wrote = [stem + ".json", stem + ".md"]
    if device.type == "cuda" and plot(router, stem + ".png"):
        wrote.append(stem + ".png")
    print("wrote", ", ".join(wrote))


if __name__ == "__main__":
    main()
