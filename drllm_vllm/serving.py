"""What a server user sees of routing: per-request reports, aggregates, metrics.

Each finished request's schedule comes back from the engine core (a separate
process) in its output's `kv_transfer_params["drllm"]`. The front end (the
API server process, which owns the output processor) sees every finished
output, and `hooks` hands each report to `record()` there. From it:
- `GET /drllm/requests/{id}`: the report of one recent request, keyed by the
  response id (`chatcmpl-...`, `cmpl-...`); streaming responses carry no
  `kv_transfer_params`, so this is where a streaming client finds its schedule;
- `GET /drllm/stats`: per-layer skip/execute/repeat counts and mean executed
  layers since start;
- Prometheus series on vLLM's `/metrics`: `drllm_layer_actions_total{layer,
  action}`, `drllm_requests_total`, `drllm_layer_applications` (histogram).

The two routes are a `vllm.endpoint_plugins` entry point (`DrllmEndpoints`).
vLLM loads endpoint plugins only when named in `VLLM_PLUGINS`, so
`VLLM_PLUGINS=drllm vllm serve <checkpoint>` (what `drllm serve` does) turns
them on; the response field and the metrics need nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from .schedule import ACTION_NAMES

RECENT_REQUESTS = 10_000  # reports kept for GET /drllm/requests/{id}


class RoutingStats:
    """Aggregates of the schedules finished requests ran, since start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.actions: list[list[int]] = []  # [layer][action] counts
        self.requests = 0
        self.layer_applications = 0  # summed over requests
        self.layers_run = 0  # layers with action >= 1, summed over requests
        self.recent: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def record(self, request_id: str, report: dict[str, Any]) -> None:
        schedule = report["schedule"]
        with self._lock:
            # grows to the deepest model seen: one process may run several
            # engines (offline, tests), and a shallower model's counts fit in
            while len(self.actions) < len(schedule):
                self.actions.append([0] * len(ACTION_NAMES))
            for layer, action in enumerate(schedule):
                self.actions[layer][action] += 1
            self.requests += 1
            self.layer_applications += report["layer_applications"]
            self.layers_run += sum(a > 0 for a in schedule)
            self.recent[request_id] = report
            if len(self.recent) > RECENT_REQUESTS:
                self.recent.popitem(last=False)
        _observe_metrics(schedule, report["layer_applications"])

    def find(self, response_id: str) -> dict[str, Any] | None:
        # a completion's prompts run as `<id>-0`, `<id>-1`, ...
        with self._lock:
            return self.recent.get(response_id) or self.recent.get(f"{response_id}-0")

    def summary(self) -> dict[str, Any]:
        with self._lock:
            n = self.requests
            return {
                "requests": n,
                "num_layers": len(self.actions),
                "mean_layer_applications": self.layer_applications / n if n else None,
                "mean_layers_run": self.layers_run / n if n else None,
                "layers": [
                    {"layer": i, **dict(zip(ACTION_NAMES, counts))}
                    for i, counts in enumerate(self.actions)
                ],
            }


STATS = RoutingStats()


def record(request_id: str, report: dict[str, Any]) -> None:
    STATS.record(request_id, report)


# -- Prometheus (vLLM's /metrics serves the default registry) ---------------
_metrics: tuple | None = None


def _observe_metrics(schedule: list[int], applications: int) -> None:
    global _metrics
    if _metrics is None:  # created on first use: only the front end records
        from prometheus_client import Counter, Histogram

        _metrics = (
            Counter("drllm_layer_actions", "Layer actions taken by finished requests",
                    ["layer", "action"]),
            Counter("drllm_requests", "Finished requests with a Dr.LLM schedule"),
            Histogram("drllm_layer_applications",
                      "Layer applications per token of finished requests",
                      buckets=[*range(0, 2 * len(schedule) + 1, 2)]),
            {},  # (layer, action) -> its labelled child: labels() costs ~1.5 us a call (timeit)
        )
    actions, requests, applications_hist, children = _metrics
    for layer, action in enumerate(schedule):
        child = children.get((layer, action))
        if child is None:
            child = children[layer, action] = actions.labels(str(layer), ACTION_NAMES[action])
        child.inc()
    requests.inc()
    applications_hist.observe(applications)


# -- HTTP routes (vllm.endpoint_plugins entry point) -------------------------
class DrllmEndpoints:
    """`GET /drllm/stats` and `GET /drllm/requests/{id}` on the API server."""

    name = "drllm"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        from fastapi import APIRouter, HTTPException

        router = APIRouter()

        @router.get("/drllm/stats")
        async def drllm_stats() -> dict[str, Any]:
            return STATS.summary()

        @router.get("/drllm/requests/{request_id}")
        async def drllm_request(request_id: str) -> dict[str, Any]:
            report = STATS.find(request_id)
            if report is None:
                raise HTTPException(
                    404, f"no finished Dr.LLM request {request_id!r} among the last "
                         f"{RECENT_REQUESTS} (use the response id, e.g. chatcmpl-...)")
            return {"id": request_id, **report}

        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        pass
