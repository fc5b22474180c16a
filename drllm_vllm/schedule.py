"""The layer schedule: one action per decoder layer, fixed for a request.

A schedule is a tuple of L ints: 0 skip, 1 execute, 2 repeat (the layer runs
twice in a row). A *path* is the same thing written as the sequence of layer
indices that run, e.g. (0, 1, 1, 3) for L=4 with layer 1 repeated and layer
2 skipped. MCTS works on paths, the engine on schedules.

Which layers may skip or repeat at all is derived from the search's labels
(`allowed_layers`) and written into the checkpoint's `drllm` block.
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

    `repeat_layers` lists the layers that may repeat (None: all of them); a
    repeat elsewhere is refused, as the layer has no second KV cache. A skip is
    accepted at any layer, also outside the checkpoint's `skip_layers`: a
    forced schedule is the user's explicit choice (skip_layers only bound
    what the routers and the bias knob choose).
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


# A layer may take an action (skip, repeat) only where the search chose it in
# at least this many labelled examples. 10 is train.py's floor for a class to
# get any loss weight: below it a router cannot learn the class, and what it
# predicts there is noise. On the shipped SmolLM2 labels (645 labelled) this
# keeps skip at 24 layers (those excluded have 5-9 skip labels, 44 of 1243)
# and repeat at none (one repeat label in all, at layer 13).
ALLOW_MIN_LABELS = 10


def allowed_layers(
    labels: Sequence[Sequence[int]], num_layers: int, min_labels: int = ALLOW_MIN_LABELS
) -> dict:
    """Layers that may skip and layers that may repeat, from search labels.

    `labels`: one schedule per labelled example (the search's `best` paths as
    L actions 0/1/2; unlabelled examples left out). A layer may skip if at
    least `min_labels` labels skip it, and may repeat if at least `min_labels`
    repeat it. Returns `skip_layers` and `repeat_layers` (sorted lists of
    layer indices) with the rule and its inputs (per-layer skip and repeat
    counts, number of labels), as recorded in the router card.
    """
    if isinstance(min_labels, bool) or not isinstance(min_labels, int) or min_labels < 1:
        raise ValueError(f"min_labels = {min_labels!r} is not accepted; use an int >= 1")
    counts = {SKIP: [0] * num_layers, REPEAT: [0] * num_layers}
    for n, row in enumerate(labels):
        if len(row) != num_layers:
            raise ValueError(
                f"label {n} has {len(row)} actions, expected one per layer ({num_layers}): "
                f"{list(row)!r}"
            )
        for i, a in enumerate(row):
            if a not in ACTIONS:
                raise ValueError(f"label {n}[{i}] = {a!r} is not an action; accepted: 0, 1, 2")
            if a in counts:
                counts[a][i] += 1
    return {
        "rule": f"a layer may skip (repeat) if at least {min_labels} labelled "
                f"examples skip (repeat) it",
        "min_labels": min_labels,
        "labelled": len(labels),
        "skip_counts": counts[SKIP],
        "repeat_counts": counts[REPEAT],
        "skip_layers": [i for i, c in enumerate(counts[SKIP]) if c >= min_labels],
        "repeat_layers": [i for i, c in enumerate(counts[REPEAT]) if c >= min_labels],
    }
