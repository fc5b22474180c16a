"""Which waiting request to admit next: group requests with matching schedules.

Cost model (docs/DESIGN.md): a layer that no row of a step runs costs
nothing, so a batch whose rows share their skipped layers gets the skips as
time. The scheduler admits waiting requests in the order given here: first
those whose schedule matches the running batch (or, with nothing running,
the oldest waiting request), then the rest by how many layer actions they
differ by, oldest first. Only schedules known at admission can be grouped:
forced (`drllm_mode="schedule"`) and full ones; routed requests learn their
schedule in their prefill, so they keep their arrival order.

Waiting stays bounded: every time a younger request is admitted before an
older one, the older one's `overtaken` count grows; once it reaches
`max_overtaken` it goes to the front (oldest first). So a request is
overtaken by at most max_overtaken + (admissions in one step) - 1 younger
requests, whatever keeps arriving.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Key = tuple[int, ...] | None  # a schedule known at admission, else None


@dataclass
class Waiting:
    key: Key
    order: int  # arrival order
    overtaken: int = 0  # younger requests admitted before this one
    resumed: bool = False  # preempted: keeps its place in front


def distance(a: Key, b: Key) -> int:
    """Layer actions in which two schedules differ (unknown: farthest)."""
    if a is None or b is None:
        return 1 << 30
    return sum(x != y for x, y in zip(a, b))


def anchor_key(running_keys: Iterable[Key], waiting: Sequence[Waiting]) -> Key:
    """The schedule to group around: the running batch's commonest, else the oldest waiting one's."""
    counts = Counter(k for k in running_keys if k is not None)
    if counts:
        return counts.most_common(1)[0][0]
    return min(waiting, key=lambda w: w.order).key if waiting else None


def admission_order(
    waiting: Sequence[Waiting], running_keys: Iterable[Key], max_overtaken: int
) -> list[int]:
    """Indices of `waiting` in the order the scheduler should try to admit them."""
    anchor = anchor_key(running_keys, waiting)

    def rank(i: int):
        w = waiting[i]
        if w.resumed or w.overtaken >= max_overtaken:
            return (0, 0, w.order)  # due: strictly oldest first
        return (1, distance(w.key, anchor), w.order)

    return sorted(range(len(waiting)), key=rank)


def record_admissions(still_waiting: Iterable[Waiting], admitted_orders: Sequence[int]) -> None:
    """Count, for each request left waiting, the younger ones admitted before it."""
    if not admitted_orders:
        return
    for w in still_waiting:
        w.overtaken += sum(o > w.order for o in admitted_orders)
