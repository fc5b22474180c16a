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
from typing import Any

import numpy as np
import torch

from .router import route_window
from .schedule import REPEAT, Schedule


# A layer that all but a few of the step's tokens run costs less run on every
# row, with the few skipping rows' states put back afterwards, than run on a
# gathered subset with attention metadata of its own (measured on CPU: 64 rows
# decoding, one or two skipping each layer; 8 prompts in prefill, one of them
# skipping: the subset ran slower than all 8; docs/architecture.md). "A few"
# is at most RESTORE_MAX_TOKENS tokens or RESTORE_MAX_FRACTION of the step's,
# whichever is more. Their KV entries for the layer get written but are never
# read: a request skips a layer for all of its tokens.
RESTORE_MAX_TOKENS = 4
RESTORE_MAX_FRACTION = 0.25


def token_positions(query_start: np.ndarray, rows: tuple[int, ...]) -> np.ndarray:
    """Flat positions of the tokens of `rows` in a packed batch whose row r
    holds tokens query_start[r]:query_start[r + 1], in row order."""
    r = np.asarray(rows, dtype=np.int64)
    starts = query_start[r].astype(np.int64)
    lens = query_start[r + 1] - starts
    before = np.cumsum(lens) - lens  # output offset where each row begins
    return np.repeat(starts - before, lens) + np.arange(int(lens.sum()), dtype=np.int64)


@dataclass(frozen=True)
class RouteRequest:
    """A row whose schedule the routers decide in this step (its prefill)."""

    row: int
    bias: float
    route_tokens: int  # pool over the first N tokens of the row's prompt...
    route_start: int = 0  # ...from this one on


@dataclass
class StepBatch:
    req_ids: list[str]
    query_start: np.ndarray  # [R + 1] token offsets of each row
    schedules: list[Schedule | None]  # None: decided by the routers this step
    to_route: list[RouteRequest]
    # enter(rows, their token index, layer_name) -> context in which attention
    # sees only `rows`
    attention_for_rows: Callable[[tuple[int, ...], torch.Tensor, str], AbstractContextManager]
    num_layers: int
    _token_index: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    _restore: dict[tuple[int, ...], tuple[int, ...] | None] = field(default_factory=dict)
    _keep_mask: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    _route_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(
        default=None, init=False
    )
    # the routers' pooling layout (kernels.pooling_layout of route_inputs),
    # built by the model at the step's first routed layer on CPU, read at the others
    route_layout: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.actions = np.ones((len(self.req_ids), self.num_layers), dtype=np.int8)
        for row, s in enumerate(self.schedules):
            if s is not None:
                self.actions[row] = s
        self.all_rows = tuple(range(len(self.req_ids)))
        # Row sets of every (layer, pass), worked out once for the step on
        # first use. A step that routes changes column l just before layer l
        # runs, so its row sets are worked out layer by layer instead.
        self._plan = None

    def reuse(self, previous: StepBatch | None) -> None:
        """Take over `previous`'s row sets, restore sets and token indices when
        this step has exactly its rows, tokens and schedules and neither step
        routes: a running decode batch, most steps. They depend on nothing
        else (attention metadata, which also depends on sequence lengths, is
        never carried over)."""
        if (
            previous is None or self.to_route or previous.to_route
            or previous.req_ids != self.req_ids
            or not np.array_equal(previous.query_start, self.query_start)
            or not np.array_equal(previous.actions, self.actions)
        ):
            return
        self._plan, self._token_index, self._restore, self._keep_mask = (
            previous._plan, previous._token_index, previous._restore, previous._keep_mask)

    def _row_sets(self, actions: np.ndarray) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """[(rows executing l, rows repeating l)] for the columns of `actions`."""
        runs, repeats = actions > 0, actions == REPEAT
        every, some = runs.all(0), repeats.any(0)
        seen: dict[bytes, tuple[int, ...]] = {}  # equal columns share one tuple

        def rows(mask: np.ndarray) -> tuple[int, ...]:
            key = mask.tobytes()
            if key not in seen:
                seen[key] = tuple(np.flatnonzero(mask).tolist())
            return seen[key]

        return [
            (
                self.all_rows if every[l] else rows(runs[:, l]),
                (self.all_rows if repeats[:, l].all() else rows(repeats[:, l])) if some[l] else (),
            )
            for l in range(actions.shape[1])
        ]

    @property
    def num_rows(self) -> int:
        return len(self.req_ids)

    def rows_running(self, layer: int, repeat_pass: bool) -> tuple[int, ...]:
        """Rows that run `layer` (its second pass if `repeat_pass`); all_rows when all do."""
        if self.to_route:
            return self._row_sets(self.actions[:, layer : layer + 1])[0][repeat_pass]
        if self._plan is None:
            self._plan = self._row_sets(self.actions)
        return self._plan[layer][repeat_pass]

    def rows_to_restore(self, rows: tuple[int, ...]) -> tuple[int, ...] | None:
        """The rows outside `rows` when they hold at most RESTORE_MAX_TOKENS tokens
        or RESTORE_MAX_FRACTION of the step's (run the layer on every row and
        restore those), else None (run `rows` only)."""
        if rows not in self._restore:
            others = tuple(sorted(set(self.all_rows) - set(rows)))
            qs = self.query_start
            tokens = int(sum(qs[r + 1] - qs[r] for r in others))
            few = max(RESTORE_MAX_TOKENS, RESTORE_MAX_FRACTION * int(qs[-1] - qs[0]))
            self._restore[rows] = others if tokens <= few else None
        return self._restore[rows]

    def layer_passes(self) -> int:
        """Layer passes this step runs for anyone: the union over its rows."""
        return int((self.actions > 0).any(0).sum() + (self.actions == REPEAT).any(0).sum())

    def applications(self) -> np.ndarray:
        """[R] layer applications per token of each row."""
        return self.actions.sum(1, dtype=np.int64)

    def token_index(self, rows: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """Flat token positions of `rows` in this step's packed batch, on `device`
        (built and copied once per step per row set, not once per layer)."""
        idx = self._token_index.get(rows)
        if idx is None:
            idx = torch.from_numpy(token_positions(self.query_start, rows)).to(device)
            self._token_index[rows] = idx
        return idx

    def keep_mask(self, rows: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """[T, 1] bool on `device`: True on the tokens of `rows` (built once per
        step per row set)."""
        mask = self._keep_mask.get(rows)
        if mask is None:
            m = np.zeros((int(self.query_start[-1]), 1), dtype=bool)
            m[token_positions(self.query_start, rows)] = True
            mask = self._keep_mask[rows] = torch.from_numpy(m).to(device)
        return mask

    def route_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(start, pooled length, bias) of each routed row; the same for every layer."""
        if self._route_inputs is None:
            qs = self.query_start
            windows = [route_window(int(qs[r.row + 1] - qs[r.row]), r.route_tokens, r.route_start)
                       for r in self.to_route]
            self._route_inputs = (
                torch.tensor([int(qs[r.row]) + a for r, (a, _) in zip(self.to_route, windows)],
                             dtype=torch.int64),
                torch.tensor([b - a for a, b in windows], dtype=torch.int64),
                torch.tensor([r.bias for r in self.to_route], dtype=torch.float32),
            )
        return self._route_inputs

    def decided(self) -> dict[str, Schedule]:
        """Schedules the routers fixed in this step, by request id."""
        return {
            self.req_ids[r.row]: tuple(int(a) for a in self.actions[r.row])
            for r in self.to_route
        }
