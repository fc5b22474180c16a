"""Every place where drllm-vllm touches vLLM's private internals (vLLM 0.32).

A vLLM upgrade should need changes here and nowhere else:
- engine settings: EngineArgs.create_engine_config is wrapped so that a
  Dr.LLM checkpoint gets the settings it needs and conflicting explicit
  settings are refused before anything starts; several CPU workers on one
  NUMA node get one core set each (`bind_cpu_ranks`);
- request validation: InputProcessor._validate_params is wrapped so bad
  drllm_* controls are a VLLMValidationError (HTTP 400) at admission;
- the model runner: `_model_forward` gives the model request identity
  (a StepBatch) and attention metadata for row subsets; schedules decided
  in a step ride back on the ModelRunnerOutput;
- the scheduler: keeps each request's schedule and returns it with the
  request's final output in `kv_transfer_params["drllm"]`; it admits waiting
  requests grouped by schedule (`grouping.py`; DRLLM_GROUPING=0 turns it off).
- the front end: OutputProcessor.process_outputs is wrapped to hand each
  finished request's report to `serving` (aggregates, /metrics); a
  DrllmConfigError that ends `vllm serve` prints as one line.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from vllm.logger import init_logger

from .batch import RouteRequest, StepBatch
from .caching import step_token_budget
from .config import ARCHITECTURES, parse_controls, parse_drllm_block
from .schedule import Schedule, full_schedule

logger = init_logger("vllm.drllm")  # under "vllm" so vLLM's log config shows it

SCHEDULER_CLS = "drllm_vllm.hooks.DrScheduler"
WORKER_CLS = {"cpu": "drllm_vllm.hooks.DrCPUWorker", "cuda": "drllm_vllm.hooks.DrGPUWorker"}
OUTPUT_KEY = "drllm"  # RequestOutput.kv_transfer_params[OUTPUT_KEY]


class DrllmConfigError(ValueError):
    """A Dr.LLM checkpoint or engine setting that cannot work."""


# -- engine settings -------------------------------------------------------
def dr_checkpoint_config(model: str, hf_overrides: Any = None) -> dict | None:
    """The config.json of a local Dr.LLM checkpoint, else None."""
    path = Path(model) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    if isinstance(hf_overrides, dict) and "architectures" in hf_overrides:
        config = {**config, **hf_overrides}
    archs = config.get("architectures") or []
    return config if archs and archs[0] in ARCHITECTURES else None


def _apply_engine_settings(args) -> list[str]:
    """Refuse conflicting explicit settings, then put ours in force.

    Prefix caching and chunked prefill stay as vLLM sets them (on by
    default): DrScheduler makes both exact under per-request schedules
    (caching.py)."""
    refused = {
        "speculative decoding": bool(args.speculative_config),
        "LoRA": bool(args.enable_lora),
        "pipeline parallelism": (args.pipeline_parallel_size or 1) > 1,
    }
    bad = [k for k, v in refused.items() if v]
    if bad:
        raise DrllmConfigError(
            f"Dr.LLM checkpoints cannot run with {', '.join(bad)}: layers run on "
            f"per-request row subsets under per-request schedules. Remove the flag(s)."
        )
    from vllm.platforms import current_platform

    device = "cuda" if current_platform.is_cuda() else "cpu"
    if args.worker_cls not in ("auto", WORKER_CLS[device]):
        raise DrllmConfigError(
            f"--worker-cls {args.worker_cls} conflicts with the Dr.LLM worker "
            f"{WORKER_CLS[device]}; leave it unset"
        )
    if args.scheduler_cls not in (None, SCHEDULER_CLS):
        raise DrllmConfigError(
            f"--scheduler-cls {args.scheduler_cls} conflicts with the Dr.LLM "
            f"scheduler {SCHEDULER_CLS}; leave it unset"
        )
    # CPU compiles as stock vLLM does (the routed loop stays in Python and
    # calls one shared compiled layer graph; model.py, compile.py). CUDA
    # stays eager: a CUDA graph captured whole would bake in one schedule,
    # and per-layer piecewise graphs are untested (docs/architecture.md).
    if device == "cuda":
        args.enforce_eager = True
    args.worker_cls = WORKER_CLS[device]
    args.scheduler_cls = SCHEDULER_CLS
    return [
        "eager execution" if args.enforce_eager else "compiled layers (one shared graph)",
        f"worker {args.worker_cls}",
        f"scheduler {args.scheduler_cls}",
    ]


def _wrap_create_engine_config(orig):
    @functools.wraps(orig)
    def create_engine_config(self, *a, **kw):
        config = dr_checkpoint_config(self.model, self.hf_overrides)
        if config is None:
            return orig(self, *a, **kw)
        _wrap_openai_requests()  # `vllm serve` has imported its request classes by now
        from .checkpoint import validate_checkpoint

        try:
            drllm = validate_checkpoint(Path(self.model), config)
        except ValueError as e:
            raise DrllmConfigError(str(e)) from None
        settings = _apply_engine_settings(self)
        vllm_config = orig(self, *a, **kw)
        sched = vllm_config.scheduler_config
        settings[:0] = [
            "exact prefix caching (salted by schedule)"
            if vllm_config.cache_config.enable_prefix_caching else "prefix caching off",
            "chunked prefill (routing windows whole, clamped to "
            f"{step_token_budget(sched.max_num_batched_tokens, sched.long_prefill_token_threshold, True)}"
            " tokens)" if sched.enable_chunked_prefill else "chunked prefill off",
        ]
        settings.append(f"max_num_batched_tokens {sched.max_num_batched_tokens}")
        sized = size_cpu_kv_cache(self, vllm_config, config)
        if sized:
            settings.append(sized)
        binding = bind_cpu_ranks(vllm_config.parallel_config)
        if binding:
            settings.append(f"one core set per CPU worker, VLLM_CPU_OMP_THREADS_BIND={binding}")
        logger.info(
            "Dr.LLM checkpoint %s: %d routers (%s), windows=%d, skip layers %s, "
            "repeat layers %s; in force: %s",
            self.model, config["num_hidden_layers"],
            "trained" if drllm.trained else "UNTRAINED (deterministic init)",
            drllm.num_windows,
            "all" if drllm.skip_layers is None else (list(drllm.skip_layers) or "none"),
            list(drllm.repeat_layers) or "none", ", ".join(settings),
        )
        return vllm_config

    create_engine_config._drllm = True
    return create_engine_config


def size_cpu_kv_cache(args, vllm_config, config: dict) -> str | None:
    """On CPU, give the KV cache a size that fits the model when the user
    chose none (`--kv-cache-memory-bytes`, `VLLM_CPU_KVCACHE_SPACE`, or a
    `--gpu-memory-utilization` other than vLLM's default).

    vLLM's CPU default reserves 92% of all memory and refuses to start when
    that much is not free, so a machine partly in use could not start the
    main job. The size is `caching.default_kv_cache_bytes`; returns the
    start-up log's description, or None where vLLM's own rule stays."""
    import dataclasses

    import psutil
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    from .caching import default_kv_cache_bytes

    cache = vllm_config.cache_config
    default_share = {f.name: f.default for f in dataclasses.fields(EngineArgs)}["gpu_memory_utilization"]
    if (not current_platform.is_cpu() or cache.kv_cache_memory_bytes is not None
            or args.gpu_memory_utilization != default_share):
        return None
    model = vllm_config.model_config
    dtype = model.dtype if cache.cache_dtype == "auto" else cache.cache_dtype
    dtype_bytes = dtype.itemsize if isinstance(dtype, torch.dtype) else 1  # fp8 caches
    available = psutil.virtual_memory().available
    size, tokens = default_kv_cache_bytes(config, dtype_bytes, model.max_model_len, available)
    tp = vllm_config.parallel_config.tensor_parallel_size
    kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
    cache.kv_cache_memory_bytes = size // tp if kv_heads % tp == 0 else size  # per worker
    return (f"KV cache {size / 2**30:.2f} GiB for {tokens:,} tokens ({available / 2**30:.1f} GiB "
            f"free; vLLM's CPU default reserves {default_share:.0%} of all memory; "
            f"--kv-cache-memory-bytes or --gpu-memory-utilization choose)")


# -- several ranks on one CPU ----------------------------------------------
BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def bind_cpu_ranks(parallel_config) -> str | None:
    """Give each CPU worker a core set of its own when vLLM would refuse to.

    vLLM's automatic binding (VLLM_CPU_OMP_THREADS_BIND unset or "auto") gives
    each local worker a NUMA node of its own and refuses more workers than
    nodes, so tensor_parallel_size=2 fails to start on a one-node machine. If
    the user has not set the variable, split the cores this process may use
    into equal contiguous sets, one per worker ("0|1" on 2 cores), and set it
    here, before vLLM spawns its engine core and workers (they inherit it).
    Like vLLM's automatic binding, one core per worker is left to the front
    end and engine core when every worker still gets at least two. Returns the
    value set, else None (one worker, the variable set, or enough nodes).
    """
    from vllm.platforms import current_platform

    # vLLM reads the variable where its multiprocess executor starts the
    # workers: one core list per local worker, all local DP ranks' in one list
    ranks = parallel_config.local_world_size * max(parallel_config.data_parallel_size_local, 1)
    if (not current_platform.is_cpu() or ranks <= 1 or BIND_ENV in os.environ
            or parallel_config.distributed_executor_backend != "mp"):
        return None
    from vllm.utils.cpu_resource_utils import get_visible_memory_node

    if len(get_visible_memory_node()) >= ranks:
        return None  # vLLM's automatic binding works: one NUMA node per worker
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < ranks:
        raise DrllmConfigError(
            f"{ranks} CPU workers (tensor x pipeline x local data parallel size) need "
            f"at least {ranks} cores, this process may use {len(cpus)} ({cpus}); lower "
            f"tensor_parallel_size or set {BIND_ENV} yourself (one core list per worker, "
            f"separated by '|')"
        )
    if len(cpus) >= 3 * ranks:
        cpus = cpus[:-ranks]
    per_rank = len(cpus) // ranks
    value = "|".join(_id_list(cpus[r * per_rank:(r + 1) * per_rank]) for r in range(ranks))
    os.environ[BIND_ENV] = value
    from vllm import envs

    if envs._is_envs_cache_enabled():  # an engine started earlier in this process
        envs.disable_envs_cache()
        envs.enable_envs_cache()
    return value


def _id_list(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (the form VLLM_CPU_OMP_THREADS_BIND takes)."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# -- request validation ----------------------------------------------------
_SERVED: dict[str, Any] = {}  # this process's model config, recorded by InputProcessor


def _check_controls(hf_config, params) -> None:
    """Bad drllm_* controls of a Dr.LLM model's request: VLLMValidationError (HTTP 400)."""
    archs = getattr(hf_config, "architectures", None) or []
    if archs and archs[0] in ARCHITECTURES and hasattr(params, "extra_args"):
        from vllm.exceptions import VLLMValidationError

        try:
            parse_controls(params.extra_args, hf_config.num_hidden_layers, _drllm_of(hf_config))
        except ValueError as e:
            raise VLLMValidationError(str(e), parameter="vllm_xargs") from None


def _wrap_validate_params(orig):
    @functools.wraps(orig)
    def _validate_params(self, params, supported_tasks):
        result = orig(self, params, supported_tasks)
        _check_controls(self.model_config.hf_config, params)
        return result

    _validate_params._drllm = True
    return _validate_params


def _wrap_input_processor_init(orig):
    @functools.wraps(orig)
    def __init__(self, *a, **kw):
        orig(self, *a, **kw)
        _SERVED["hf_config"] = self.model_config.hf_config

    __init__._drllm = True
    return __init__


def _wrap_to_sampling_params(orig):
    """The OpenAI server checks the controls as it builds the sampling
    parameters, before a streamed response starts: a bad value is a real
    HTTP 400 there too, not an error event inside a 200 stream."""

    @functools.wraps(orig)
    def to_sampling_params(self, *a, **kw):
        params = orig(self, *a, **kw)
        if "hf_config" in _SERVED:
            _check_controls(_SERVED["hf_config"], params)
        return params

    to_sampling_params._drllm = True
    return to_sampling_params


def _wrap_openai_requests() -> None:
    """Wrap the OpenAI request classes' to_sampling_params where the server has
    imported them (the API server process; idempotent)."""
    for module, cls in (("vllm.entrypoints.openai.chat_completion.protocol",
                         "ChatCompletionRequest"),
                        ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest")):
        request_cls = getattr(sys.modules.get(module), cls, None)
        if request_cls is not None and not getattr(request_cls.to_sampling_params, "_drllm", False):
            request_cls.to_sampling_params = _wrap_to_sampling_params(request_cls.to_sampling_params)


_DRLLM_BLOCKS: dict[int, tuple[dict, dict, Any]] = {}  # id(block) -> (block, copy, parsed)


def _drllm_of(hf_config):
    """The parsed `drllm` block of a model config (`parse_drllm_block`),
    parsed once per block object and re-parsed if it was changed in place.

    Called for every request, so it must not serialise the block (it carries
    the router card, ~7 kB: json.dumps cost 0.14 ms a call); the check that it
    is unchanged is one dict comparison (~3 us). Nothing is stored on the HF
    config itself: vLLM hashes it."""
    block = hf_config.drllm
    hit = _DRLLM_BLOCKS.get(id(block))
    if hit is not None and hit[0] is block and hit[1] == block:
        return hit[2]
    parsed = parse_drllm_block(SimpleNamespace(drllm=block, num_hidden_layers=10**9))
    if len(_DRLLM_BLOCKS) >= 8:
        _DRLLM_BLOCKS.clear()
    _DRLLM_BLOCKS[id(block)] = (block, copy.deepcopy(block), parsed)
    return parsed


def install() -> None:
    """Wrap the front-end entry points (idempotent)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.engine.output_processor import OutputProcessor

    if not getattr(EngineArgs.create_engine_config, "_drllm", False):
        EngineArgs.create_engine_config = _wrap_create_engine_config(
            EngineArgs.create_engine_config
        )
    if not getattr(InputProcessor._validate_params, "_drllm", False):
        InputProcessor._validate_params = _wrap_validate_params(
            InputProcessor._validate_params
        )
    if not getattr(InputProcessor.__init__, "_drllm", False):
        InputProcessor.__init__ = _wrap_input_processor_init(InputProcessor.__init__)
    _wrap_openai_requests()
    if not getattr(OutputProcessor.process_outputs, "_drllm", False):
        OutputProcessor.process_outputs = _wrap_process_outputs(
            OutputProcessor.process_outputs
        )
    if not getattr(sys.excepthook, "_drllm", False):
        sys.excepthook = _one_line_config_errors(sys.excepthook)


# -- front end: finished requests' reports, clear start-up errors ----------
def _wrap_process_outputs(orig):
    """Hand each finished request's report to `serving.record` (front end)."""

    @functools.wraps(orig)
    def process_outputs(self, engine_core_outputs, *a, **kw):
        finished = [
            (o.request_id, o.kv_transfer_params[OUTPUT_KEY])
            for o in engine_core_outputs
            if o.kv_transfer_params and OUTPUT_KEY in o.kv_transfer_params
        ]
        # the external id (what the response carries) before orig drops the state
        ids = {rid: getattr(self.request_states.get(rid), "external_req_id", None) or rid
               for rid, _ in finished}
        result = orig(self, engine_core_outputs, *a, **kw)
        if finished:
            from . import serving

            for rid, report in finished:
                serving.record(ids[rid], report)
        return result

    process_outputs._drllm = True
    return process_outputs


def _one_line_config_errors(orig):
    """`vllm serve <bad checkpoint>` ends with one line, not vLLM's traceback."""

    def excepthook(kind, value, tb):
        if isinstance(value, DrllmConfigError):
            print(f"drllm: error: {value}", file=sys.stderr)
        else:
            orig(kind, value, tb)

    excepthook._drllm = True
    return excepthook


# -- model runner ----------------------------------------------------------
class DrRunnerMixin:
    """Gives a Dr.LLM model its StepBatch and remembers request schedules."""

    def _drllm_setup(self) -> None:
        self._drllm_schedules: dict[str, Schedule] = {}  # live requests
        self._drllm_decided: dict[str, Schedule] = {}  # to report this step
        self._drllm_stats = _zero_stats()
        self._drllm_last_step: StepBatch | None = None  # its row sets may carry over
        # Diagnostics (`drllm bench`'s full-loop case): DRLLM_LAYER_LOOP=1 sends
        # steps in which every row runs every layer through the per-layer loop
        # too, instead of vLLM's whole-model graph, to measure what the loop costs.
        self._drllm_layer_loop = os.environ.get("DRLLM_LAYER_LOOP", "0") == "1"

    def _model_forward(self, input_ids=None, positions=None, **kwargs):
        model = self.get_model()
        if not hasattr(model, "drllm"):
            return super()._model_forward(input_ids=input_ids, positions=positions, **kwargs)
        model.drllm_step = self._drllm_step(model)
        try:
            return super()._model_forward(input_ids=input_ids, positions=positions, **kwargs)
        finally:
            step, model.drllm_step = model.drllm_step, None
            self._drllm_count(step, model.num_layers)
            if step is not None and step.to_route:
                decided = step.decided()
                self._drllm_schedules.update(decided)
                self._drllm_decided.update(decided)

    def _drllm_step(self, model) -> StepBatch | None:
        n = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:n]
        num_layers = model.num_layers
        query_start = self.query_start_loc.cpu[: n + 1].numpy().copy()
        schedules: list[Schedule | None] = []
        to_route: list[RouteRequest] = []
        for row, rid in enumerate(req_ids):
            schedule = self._drllm_schedules.get(rid)
            if schedule is None:
                schedule = self._first_sight(model, row, rid, query_start, to_route)
            schedules.append(schedule)
        full = full_schedule(num_layers)
        if not to_route and all(s == full for s in schedules) and not self._drllm_layer_loop:
            return None  # every row runs every layer: vLLM's own forward, no overhead
        step = StepBatch(
            req_ids=list(req_ids),
            query_start=query_start,
            schedules=schedules,
            to_route=to_route,
            attention_for_rows=self._attention_for_rows_factory(),
            num_layers=num_layers,
        )
        step.reuse(self._drllm_last_step)
        self._drllm_last_step = step
        return step

    def _drllm_count(self, step: StepBatch | None, num_layers: int) -> None:
        """Executed-layer counts of this step (the benchmark reads them)."""
        n = self.input_batch.num_reqs
        q = self.query_start_loc.cpu[: n + 1].numpy()
        tokens = q[1:] - q[:-1]
        if step is None:  # every row, every layer once
            passes, applications = num_layers, int(tokens.sum()) * num_layers
        else:
            passes, applications = step.layer_passes(), int(tokens @ step.applications())
        st = self._drllm_stats
        kind = "decode" if n and int(tokens.max()) == 1 else "prefill"
        st[f"{kind}_steps"] += 1
        st[f"{kind}_tokens"] += int(tokens.sum())
        st[f"{kind}_layer_passes"] += passes
        st[f"{kind}_applications"] += applications

    def drllm_stats(self, reset: bool = False) -> dict[str, int]:
        model = self.get_model()
        graphs = [getattr(model, name, None) for name in ("layer_graph", "keep_graph")]
        # 1 once the shared compiled layer graphs (plain and keep-mask) exist
        # (0: eager layers)
        stats = {**self._drllm_stats,
                 "layer_graph_compiled": int(all(g and g.compiled for g in graphs)),
                 # 1 when their calls run inductor's code without AOT's wrappers
                 "layer_graph_direct": int(all(g and g.direct for g in graphs))}
        if reset:
            self._drllm_stats = _zero_stats()
        return stats

    def _first_sight(self, model, row, rid, query_start, to_route) -> Schedule | None:
        """A request's first step: fix its schedule now or route it."""
        state = self.requests[rid]
        controls = parse_controls(
            state.sampling_params.extra_args, model.num_layers, model.drllm
        )
        if controls.mode == "full":
            schedule = full_schedule(model.num_layers)
        elif controls.mode == "schedule":
            schedule = controls.schedule
        else:
            # The scheduler admits a routed request with its whole routing
            # window in this step and nothing read from the prefix cache
            # (DrScheduler._admit, caching.py); anything else is a bug.
            end = min(controls.route_tokens or len(state.prompt_token_ids),
                      len(state.prompt_token_ids))
            in_step = int(query_start[row + 1] - query_start[row])
            if self.input_batch.num_computed_tokens_cpu[row] != 0 or in_step < end:
                raise RuntimeError(
                    f"request {rid} reached routing with "
                    f"{self.input_batch.num_computed_tokens_cpu[row]} tokens computed and "
                    f"{in_step} in this step; its routers need prompt tokens 0..{end} in one step"
                )
            to_route.append(RouteRequest(row, controls.bias, end, controls.route_start))
            return None
        self._drllm_schedules[rid] = schedule
        self._drllm_decided[rid] = schedule
        return schedule

    def _attention_for_rows_factory(self):
        """Per-step cache of attention metadata for row subsets."""
        from vllm.forward_context import get_forward_context
        from vllm.v1.attention.backend import CommonAttentionMetadata

        if len(self.kv_cache_config.kv_cache_groups) != 1:
            raise DrllmConfigError(
                "Dr.LLM supports models with one KV cache group (uniform attention)"
            )
        n = self.input_batch.num_reqs
        qsl = self.query_start_loc.cpu[: n + 1]
        q_np = qsl.numpy()
        seq_lens = self.seq_lens[:n]
        seq_lens_cpu = self.optimistic_seq_lens_cpu[:n]
        block_table = self.input_batch.block_table[0].get_device_tensor(n)
        group = self.attn_groups[0][0]
        cache: dict[tuple[int, ...], tuple[Any, torch.Tensor]] = {}

        def build(rows: tuple[int, ...], tok: torch.Tensor, full_slots: torch.Tensor):
            r_np = np.asarray(rows, dtype=np.int64)
            q_lens = q_np[r_np + 1] - q_np[r_np]
            new_qsl = torch.zeros(len(rows) + 1, dtype=qsl.dtype)
            new_qsl[1:] = torch.from_numpy(np.cumsum(q_lens))
            r = torch.from_numpy(r_np)
            r_dev = r.to(self.device)
            seq_cpu = seq_lens_cpu[r]
            slots = full_slots[tok]
            cm = CommonAttentionMetadata(
                query_start_loc=new_qsl.to(self.device),
                query_start_loc_cpu=new_qsl,
                seq_lens=seq_lens[r_dev],
                seq_lens_cpu_upper_bound=seq_cpu,
                num_reqs=len(rows),
                num_actual_tokens=int(tok.numel()),
                max_query_len=int(q_lens.max()),
                max_seq_len=int(seq_cpu.max()),
                block_table_tensor=block_table[r_dev],
                slot_mapping=slots,
                causal=True,
            )
            return group.build_metadata(cm), slots

        @contextmanager
        def attention_for_rows(rows: tuple[int, ...], tok: torch.Tensor, layer_name: str):
            ctx = get_forward_context()
            meta = ctx.attn_metadata
            slot_map = ctx.slot_mapping
            if rows not in cache:
                cache[rows] = build(rows, tok, slot_map[layer_name])
            old = meta[layer_name], slot_map[layer_name]
            meta[layer_name], slot_map[layer_name] = cache[rows]
            try:
                yield
            finally:
                meta[layer_name], slot_map[layer_name] = old

        return attention_for_rows

    def _on_request_state_removed(self, req_id, req_state) -> None:
        self._drllm_schedules.pop(req_id, None)
        super()._on_request_state_removed(req_id, req_state)

    def sample_tokens(self, grammar_output):
        out = super().sample_tokens(grammar_output)
        if self._drllm_decided and out is not None and hasattr(out, "req_ids"):
            out.drllm_schedules = self._drllm_decided
            self._drllm_decided = {}
        return out


def _zero_stats() -> dict[str, int]:
    return {f"{k}_{m}": 0 for k in ("prefill", "decode")
            for m in ("steps", "tokens", "layer_passes", "applications")}


def _runner_class(base: type) -> type:
    class Runner(DrRunnerMixin, base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._drllm_setup()

    Runner.__name__ = Runner.__qualname__ = f"Dr{base.__name__}"
    return Runner


def _worker_class(base: type, runner_base: type, runner_module) -> type:
    runner_cls = _runner_class(runner_base)

    class Worker(base):
        def drllm_stats(self, reset: bool = False) -> dict[str, int]:
            """Executed-layer counts since the last reset (LLM.collective_rpc)."""
            return self.model_runner.drllm_stats(reset)

        def init_device(self):
            # the stock init_device builds the stock runner; build ours instead
            original = getattr(runner_module, runner_base.__name__)
            setattr(runner_module, runner_base.__name__, runner_cls)
            try:
                super().init_device()
            finally:
                setattr(runner_module, runner_base.__name__, original)

    Worker.__name__ = Worker.__qualname__ = f"Dr{base.__name__}"
    return Worker


def _cpu_worker():
    from vllm.v1.worker import cpu_worker
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    return _worker_class(cpu_worker.CPUWorker, CPUModelRunner, cpu_worker)


def _gpu_worker():
    # Model Runner V1 only (set VLLM_USE_V2_MODEL_RUNNER=0); not tested in CI.
    from vllm.v1.worker import gpu_worker
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return _worker_class(gpu_worker.Worker, GPUModelRunner, gpu_worker)


def __getattr__(name: str):
    # worker classes are built on first use so importing hooks stays cheap
    if name == "DrCPUWorker":
        return _cpu_worker()
    if name == "DrGPUWorker":
        return _gpu_worker()
    raise AttributeError(name)


# -- scheduler -------------------------------------------------------------
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402


ROUTED_KEYS_KEPT = 65536  # routing keys whose schedule the scheduler remembers


class DrScheduler(Scheduler):
    """Keeps each request's schedule; returns it with the final output.

    Admits waiting requests grouped by schedule (see grouping.py), so that
    layers skipped by a whole step cost nothing. DRLLM_GROUPING=0 admits in
    plain arrival order; DRLLM_MAX_OVERTAKEN bounds how many younger requests
    may be admitted before a waiting one (default 4 x max_num_seqs).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._drllm_schedules: dict[str, Schedule] = {}
        self._drllm_grouping = os.environ.get("DRLLM_GROUPING", "1") != "0"
        self._drllm_max_overtaken = int(os.environ.get(
            "DRLLM_MAX_OVERTAKEN", 4 * self.scheduler_config.max_num_seqs
        ))
        self._drllm_waiting: dict[str, Any] = {}  # request id -> grouping.Waiting
        self._drllm_arrivals = 0
        hf_config = self.vllm_config.model_config.hf_config
        self._drllm_num_layers = hf_config.num_hidden_layers
        self._drllm_block = _drllm_of(hf_config) if hasattr(hf_config, "drllm") else None
        from collections import OrderedDict

        sc = self.scheduler_config
        self._drllm_budget = step_token_budget(
            sc.max_num_batched_tokens, sc.long_prefill_token_threshold, sc.enable_chunked_prefill)
        # routing key -> the schedule its first request was routed to (LRU)
        self._drllm_routed: OrderedDict[str, Schedule] = OrderedDict()
        self._drllm_key_of: dict[str, str] = {}  # routing now: request id -> routing key
        self._drllm_user_salt: dict[str, str | None] = {}  # request id -> the user's cache_salt
        self._drllm_route_end: dict[str, int] = {}  # not yet routed: first chunk must reach this
        logger.info("Dr.LLM scheduler: grouping by schedule %s (max overtaken %d)",
                    "on" if self._drllm_grouping else "off", self._drllm_max_overtaken)

    def add_request(self, request) -> None:
        from .grouping import Waiting

        if self._drllm_block is not None:
            self._admit(request)
        self._drllm_waiting[request.request_id] = Waiting(self._known_schedule(request),
                                                          self._drllm_arrivals)
        self._drllm_arrivals += 1
        super().add_request(request)

    def _admit(self, request) -> None:
        """Salt the request's prefix-cache key by its schedule (caching.py):
        known at admission for full and forced requests, and for a routed
        request whose routing key was routed before (it is pinned to that
        schedule); otherwise private until its routers have decided."""
        from . import caching

        controls = parse_controls(request.sampling_params.extra_args,
                                  self._drllm_num_layers, self._drllm_block)
        rid = request.request_id
        self._drllm_user_salt[rid] = request.cache_salt
        if controls.mode != "routed":
            schedule = (full_schedule(self._drllm_num_layers) if controls.mode == "full"
                        else controls.schedule)
            ours = caching.schedule_salt(schedule)
        else:
            prompt = request.prompt_token_ids or []
            end = caching.route_end(request.num_prompt_tokens, controls.route_tokens,
                                    self._drllm_budget)
            start = min(controls.route_start, end - 1)
            if end < (controls.route_tokens or request.num_prompt_tokens):  # clamped to the budget
                self._set_controls(request, drllm_route_tokens=end,
                                   drllm_route_start=start)
            # prompt embeddings carry no token ids to key by: route afresh, always
            key = (caching.routing_key(prompt, end, start, controls.bias)
                   if request.prompt_embeds is None else None)
            known = self._drllm_routed.get(key) if key else None
            if known is not None:  # run it as that request ran: a forced schedule
                self._drllm_routed.move_to_end(key)
                self._pin(request, known)
                ours = caching.schedule_salt(known)
            else:  # its routers need the window's states: read nothing, share nothing yet
                self._drllm_route_end[rid] = end
                if key:
                    self._drllm_key_of[rid] = key
                request.skip_reading_prefix_cache = True
                ours = caching.private_salt(key or caching.SALT_PREFIX, rid)
        self._salt(request, ours)

    def _salt(self, request, ours: str) -> None:
        """Set the request's salt (the user's, then ours) and hash its blocks again."""
        from .caching import combine_salt

        request.cache_salt = combine_salt(self._drllm_user_salt.get(request.request_id), ours)
        if request.block_hashes:  # hashed with another salt at creation or admission
            request.block_hashes = []
            request.update_block_hashes()

    def _rekey(self, request, ours: str) -> None:
        """File the blocks the request has cached so far under salt `ours`:
        they were computed under the schedule that salt stands for."""
        from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

        self._salt(request, ours)
        if not request.block_hashes:  # prefix caching off, or no full block yet
            return
        pool = self.kv_cache_manager.block_pool
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            if manager.block_size != pool.hash_block_size:
                continue  # hashes at another granularity: leave those blocks private
            cached = manager.num_cached_block.get(request.request_id, 0)
            for i, block in enumerate(manager.req_to_blocks[request.request_id][:cached]):
                if block.is_null or i >= len(request.block_hashes):
                    continue
                pool._emit_block_removed_events(pool._remove_cached_block_hashes(block))
                pool._insert_block_hash(
                    make_block_hash_with_group_id(request.block_hashes[i],
                                                  manager.kv_cache_group_id),
                    block, num_tokens=(i + 1) * manager.block_size,
                )

    @staticmethod
    def _set_controls(request, drop_others: bool = False, **controls) -> None:
        """Set some drllm_* controls of one request (dropping its other drllm_*
        ones if `drop_others`) on its own copy of the sampling parameters:
        the caller's object may be shared."""
        params = request.sampling_params.clone()
        args = params.extra_args or {}
        if drop_others:
            args = {k: v for k, v in args.items() if not k.startswith("drllm_")}
        params.extra_args = {**args, **controls}
        request.sampling_params = params

    def _pin(self, request, schedule: Schedule) -> None:
        """From now on the request runs `schedule` (also after a preemption)."""
        self._set_controls(request, drop_others=True, drllm_mode="schedule",
                           drllm_schedule=list(schedule))
        self._drllm_route_end.pop(request.request_id, None)

    def _reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens):
        # A routed request's routing window is computed in one step: its first
        # chunk reaches the window's end, or it waits.
        n = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        end = self._drllm_route_end.get(request.request_id)
        if end is not None and num_computed_tokens == 0 and n < end:
            return 0
        return n

    def _known_schedule(self, request) -> Schedule | None:
        """The schedule a request will run if known before its prefill (not routed)."""
        if self._drllm_block is None:
            return None
        controls = parse_controls(request.sampling_params.extra_args,
                                  self._drllm_num_layers, self._drllm_block)
        if controls.mode == "full":
            return full_schedule(self._drllm_num_layers)
        return controls.schedule if controls.mode == "schedule" else None

    def schedule(self, *args, **kwargs):
        from collections import deque

        from .grouping import admission_order, record_admissions

        queue = self.waiting
        if not (self._drllm_grouping and len(queue) > 1 and isinstance(queue, deque)):
            return super().schedule(*args, **kwargs)
        states = self._drllm_waiting
        reqs = list(queue)
        for r in reqs:  # a preempted request keeps its place in front
            states[r.request_id].resumed = r.num_computed_tokens > 0 or r.num_preemptions > 0
        running = [self._drllm_schedules.get(r.request_id)
                   or getattr(states.get(r.request_id), "key", None) for r in self.running]
        order = admission_order([states[r.request_id] for r in reqs], running,
                                self._drllm_max_overtaken)
        queue.clear()
        queue.extend(reqs[i] for i in order)
        out = super().schedule(*args, **kwargs)
        left = {r.request_id for r in queue}
        admitted = [states[r.request_id].order for r in reqs if r.request_id not in left]
        record_admissions((states[rid] for rid in left), admitted)
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        decided = getattr(model_runner_output, "drllm_schedules", None)
        if decided:
            self._drllm_schedules.update(decided)
            for rid, schedule in decided.items():
                if rid in self._drllm_route_end and rid in self.requests:
                    self._routed(self.requests[rid], schedule)
        return super().update_from_output(scheduler_output, model_runner_output)

    def _routed(self, request, schedule: Schedule) -> None:
        """A routed request got its schedule: remember it for the request's
        routing key, pin the request to it, and file its blocks under it."""
        from .caching import schedule_salt

        key = self._drllm_key_of.pop(request.request_id, None)
        if key is not None and key not in self._drllm_routed:  # the first decision stands
            self._drllm_routed[key] = schedule
            while len(self._drllm_routed) > ROUTED_KEYS_KEPT:
                self._drllm_routed.popitem(last=False)
        self._pin(request, schedule)
        self._rekey(request, schedule_salt(schedule))
        # from now on it may read blocks computed under its schedule (after a preemption)
        request.skip_reading_prefix_cache = request.get_skip_reading_prefix_cache()

    def _free_request(self, request, *args, **kwargs):
        kv_params, ec_params = super()._free_request(request, *args, **kwargs)
        self._drllm_waiting.pop(request.request_id, None)
        self._drllm_route_end.pop(request.request_id, None)
        self._drllm_key_of.pop(request.request_id, None)
        self._drllm_user_salt.pop(request.request_id, None)
        schedule = self._drllm_schedules.pop(request.request_id, None)
        if schedule is not None:
            kv_params = {**(kv_params or {}), OUTPUT_KEY: report(schedule)}
        return kv_params, ec_params


def report(schedule: Schedule) -> dict[str, Any]:
    return {"schedule": list(schedule), "layer_applications": sum(schedule)}
