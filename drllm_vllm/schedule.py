"""The layer schedule: one action per decoder layer, fixed for a request.

A schedule is a tuple of L ints: 0 skip, 1 execute, 2 repeat (the layer runs
twice in a row). A *path* is the same thing written as the sequence of layer
indices that run, e.g. (0, 1, 1, 3) for L=4 with layer 1 repeated and layer
2 skipped. MCTS works on paths, the engine on schedules.
"""

from __future__ import annotations

from collections.abc import Sequence

SKIP, EXECUTE, REPEAT = 0, 1, 2
ACTIONS = (SKIP, EXECUTE, REPEAT)
ACTION_NAMES = ("skip", "execute", "repeat")

Schedule = tuple[int, ...]


def full_schedule(num_layers: int) -> Schedule:
    return (EXECUTE,) * num_layers


def check_schedule(
    schedule: object, num_layers: int, repeat_layers: Sequence[int] | None = None
) -> Schedule:
    """Return `schedule` as a tuple, or raise ValueError naming what is wrong.

    `repeat_layers` lists the layers that may repeat (None: all of them).
    """
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence):
        raise ValueError(
            f"drllm_schedule must be a list of {num_layers} ints in {{0, 1, 2}}, "
            f"got {schedule!r}"
        )
    if len(schedule) != num_layers:
        raise ValueError(
            f"drllm_schedule must have one entry per decoder layer "
            f"({num_layers}), got {len(schedule)}: {list(schedule)!r}"
        )
    for i, a in enumerate(schedule):
        if isinstance(a, bool) or not isinstance(a, int) or a not in ACTIONS:
            raise ValueError(
                f"drllm_schedule[{i}] = {a!r} is not an action; accepted: "
                f"0 (skip), 1 (execute), 2 (repeat)"
            )
        if a == REPEAT and repeat_layers is not None and i not in repeat_layers:
            raise ValueError(
                f"drllm_schedule[{i}] = 2 (repeat), but layer {i} may not repeat "
                f"in this checkpoint; layers that may repeat: {sorted(repeat_layers)}"
            )
    return tuple(int(a) for a in schedule)


def schedule_to_path(schedule: Sequence[int]) -> tuple[int, ...]:
    return tuple(i for i, a in enumerate(schedule) for _ in range(a))


def path_to_schedule(path: Sequence[int], num_layers: int) -> Schedule:
    """Inverse of schedule_to_path for paths that keep layer order."""
    counts = [0] * num_layers
    for i in path:
        counts[i] += 1
    if any(c > REPEAT for c in counts) or list(path) != sorted(path):
        raise ValueError(f"path {list(path)} is not an ordered path of actions 0/1/2")
    return tuple(counts)


def layer_applications(schedule: Sequence[int]) -> int:
    """Decoder-layer applications per token under this schedule."""
    return sum(schedule)
