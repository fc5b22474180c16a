"""Monte Carlo Tree Search over layer paths (the paper's supervision).

A path is a schedule: how many times each layer runs, 0/1/2, in layer
order. From a path the actions are: skip one layer application, skip two
consecutive applications, or repeat one layer once. Selection is UCB with a
length penalty, Q/v + c*sqrt(ln V / v) - lambda*|path|/L, and a random child
with probability `p_random`; evaluations are memoised; the search stops
early once a wrong default becomes correct or a correct path saves at least
`min_saving` layers. The answer is the shortest correct path (ties: fewer
distinct layers, then the first found); per-layer labels are its counts.

`Search` is a small state machine so that many examples' searches can run
in lock-step and have their paths evaluated together in one engine call:
`pending()` gives the path it needs scored next (None when done), `report()`
gives it the reward.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from ..schedule import Schedule, full_schedule


@dataclass(frozen=True)
class MCTSConfig:
    simulations: int = 50
    c: float = 1.8
    length_penalty: float = 3.0  # lambda
    p_random: float = 0.1
    min_saving: int = 2
    early_stop: bool = True


def children_of(s: Schedule) -> list[Schedule]:
    """Paths one action away (skip 1, skip 2 consecutive, repeat 1), deduplicated."""
    path = [i for i, n in enumerate(s) for _ in range(n)]
    out: dict[Schedule, None] = {}

    def add(removed: list[int] = (), repeated: int | None = None) -> None:
        t = list(s)
        for i in removed:
            t[i] -= 1
        if repeated is not None:
            t[repeated] = 2
        out.setdefault(tuple(t))

    for j in range(len(path)):
        add([path[j]])
        if j + 1 < len(path):
            add([path[j], path[j + 1]])
    for i, n in enumerate(s):
        if n == 1:
            add(repeated=i)
    out.pop(s, None)
    return list(out)


def better(a: Schedule, b: Schedule | None) -> bool:
    """Is correct path a preferred to b: shorter, then fewer distinct layers."""
    if b is None:
        return True
    return (sum(a), sum(1 for n in a if n)) < (sum(b), sum(1 for n in b if n))


@dataclass
class _Node:
    schedule: Schedule
    visits: int = 0
    value: float = 0.0
    children: list[_Node] | None = None


@dataclass
class Search:
    num_layers: int
    config: MCTSConfig = field(default_factory=MCTSConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.root = _Node(full_schedule(self.num_layers))
        self.memo: dict[Schedule, float] = {}
        self.simulations = 0
        self.best: Schedule | None = None
        self.default_correct: bool | None = None
        self._trail: list[_Node] = [self.root]
        self._done = False

    # ------------------------------------------------------------ stepping
    def pending(self) -> Schedule | None:
        """The next path to evaluate, or None once the search is over."""
        while not self._done:
            node = self._trail[-1]
            if node.schedule not in self.memo:
                return node.schedule
            self._finish_simulation(self.memo[node.schedule])
            if not self._done:
                self._trail = self._select()
        return None

    def report(self, schedule: Schedule, reward: float) -> None:
        """The reward of the path `pending()` asked for."""
        if self._done or self._trail[-1].schedule != schedule:
            raise ValueError(f"report for {schedule}, which is not the pending path")
        self.memo[schedule] = float(reward)
        if self.default_correct is None:
            self.default_correct = reward > 0

    # ------------------------------------------------------------ internals
    def _select(self) -> list[_Node]:
        trail = [self.root]
        node = self.root
        while node.schedule in self.memo:
            if node.children is None:
                node.children = [_Node(c) for c in children_of(node.schedule)]
            if not node.children:
                break
            node = self._choose(node)
            trail.append(node)
        return trail

    def _choose(self, parent: _Node) -> _Node:
        if self.rng.random() < self.config.p_random:
            return self.rng.choice(parent.children)
        prior = parent.value / max(parent.visits, 1)  # unvisited: parent's mean
        log_n = math.log(max(parent.visits, 1) + 1)

        def ucb(ch: _Node) -> float:
            q = ch.value / ch.visits if ch.visits else prior
            explore = self.config.c * math.sqrt(log_n / (ch.visits + 1))
            return q + explore - self.config.length_penalty * sum(ch.schedule) / self.num_layers

        return max(parent.children, key=ucb)

    def _finish_simulation(self, reward: float) -> None:
        for node in self._trail:
            node.visits += 1
            node.value += reward
        leaf = self._trail[-1].schedule
        if reward > 0 and better(leaf, self.best):
            self.best = leaf
        self.simulations += 1
        saving = self.num_layers - sum(self.best) if self.best else 0
        found = self.best is not None and (
            not self.default_correct or saving >= self.config.min_saving)
        if (self.config.early_stop and found) or self.simulations >= self.config.simulations:
            self._done = True

    # ------------------------------------------------------------ result
    @property
    def done(self) -> bool:
        return self._done

    @property
    def paths_evaluated(self) -> int:
        return len(self.memo)
