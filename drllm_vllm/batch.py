"""One engine step seen by the routed layer loop.

The runner (hooks.py) fills a StepBatch before each forward: which request
is on each row, where its tokens are, its schedule if already fixed, or how
to route it if this step is its prefill. The model asks it for row subsets;
everything that does not depend on the layer is computed once per step and
cached here.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np
import torch

from .schedule import REPEAT, Schedule


@dataclass(frozen=True)
class RouteRequest:
    """A row whose schedule the routers decide in this step (its prefill)."""

    row: int
    bias: float
    route_tokens: int  # pool over the first N tokens of the row's prompt


@dataclass
class StepBatch:
    req_ids: list[str]
    query_start: np.ndarray  # [R + 1] token offsets of each row
    schedules: list[Schedule | None]  # None: decided by the routers this step
    to_route: list[RouteRequest]
    # enter(rows, layer_name) -> context in which attention sees only `rows`
    attention_for_rows: Callable[[tuple[int, ...], str], AbstractContextManager]
    num_layers: int
    _token_index: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.actions = np.ones((len(self.req_ids), self.num_layers), dtype=np.int8)
        for row, s in enumerate(self.schedules):
            if s is not None:
                self.actions[row] = s
        self.all_rows = tuple(range(len(self.req_ids)))

    @property
    def num_rows(self) -> int:
        return len(self.req_ids)

    def rows_running(self, layer: int, repeat_pass: bool) -> tuple[int, ...]:
        col = self.actions[:, layer]
        mask = col == REPEAT if repeat_pass else col > 0
        if mask.all():
            return self.all_rows
        return tuple(np.flatnonzero(mask).tolist())

    def token_index(self, rows: tuple[int, ...]) -> torch.Tensor:
        """Flat token positions of `rows` in this step's packed batch."""
        idx = self._token_index.get(rows)
        if idx is None:
            qs = self.query_start
            idx = torch.from_numpy(
                np.concatenate([np.arange(qs[r], qs[r + 1]) for r in rows])
            )
            self._token_index[rows] = idx
        return idx

    def decided(self) -> dict[str, Schedule]:
        """Schedules the routers fixed in this step, by request id."""
        return {
            self.req_ids[r.row]: tuple(int(a) for a in self.actions[r.row])
            for r in self.to_route
        }
