"""Which subtask the policy is asked for now, in an operator-ordered sequence (DESIGN.md section 9).

Why one class for the robot and for evaluation: ``policy_node`` and ``vqbet eval --task-sequence`` must
advance the goal by the same rule, or an offline figure says nothing about the robot. The rule: the
goal advances when the model's completion score has stayed at or above ``threshold`` for ``debounce``
seconds (0: the first score above it), or when the operator says so (``advance()``); when the last
subtask is done the sequence is finished and the caller holds the arm. Scores only count while the
caller says the policy is running (``update(..., active=True)``): a disabled robot completes nothing.

For ``refractory`` seconds after an advance the scores are not counted. Why: right after the goal
changes, the robot is still where the last subtask ended - a state the demonstrations never showed with
the new goal - and a completion head may fire there, which cascaded through a whole sequence in a few
steps when measured (kitchen_goal, 200 advances in 50 episodes, none on a completed subtask).
"""

from __future__ import annotations

import math

from vqbet_core.errors import VqbetError


class TaskSequencer:
    def __init__(self, sequence: list[str], known: list[str] | None = None, threshold: float = 0.5,
                 debounce: float = 0.0, refractory: float = 0.0):
        sequence = [str(s) for s in sequence]
        if not sequence:
            raise VqbetError("task sequence: expected at least one subtask name")
        if known is not None:
            unknown = [s for s in sequence if s not in known]
            if unknown:
                raise VqbetError(f"task sequence: unknown subtask(s) {unknown} (this model knows: {', '.join(known)})")
        if not (isinstance(threshold, (int, float)) and 0.0 < threshold <= 1.0):
            raise VqbetError(f"completion threshold must be in (0, 1], got {threshold!r}")
        for name, value in (("debounce", debounce), ("refractory", refractory)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise VqbetError(f"completion {name} must be a time >= 0 s, got {value!r}")
        self.refractory = float(refractory)
        self._since: float | None = None  # when the current goal started (for the refractory time)
        self.sequence = sequence
        self.threshold = float(threshold)
        self.debounce = float(debounce)
        self.index = 0
        self.score: float | None = None
        self._above_since: float | None = None
        self.events: list[tuple[float, str, str]] = []  # (time, subtask left, "model" | "operator")

    @property
    def current(self) -> str | None:
        """The subtask asked for now; None once the sequence is finished."""
        return self.sequence[self.index] if self.index < len(self.sequence) else None

    @property
    def finished(self) -> bool:
        return self.index >= len(self.sequence)

    @property
    def progress(self) -> tuple[int, int]:
        """(subtasks done, sequence length)."""
        return self.index, len(self.sequence)

    def advance(self, now: float, source: str = "operator") -> bool:
        """Go to the next subtask (operator's "done", or the completion rule); False when already finished."""
        if self.finished:
            return False
        self.events.append((float(now), self.sequence[self.index], source))
        self.index += 1
        self._above_since = None
        self._since = float(now)
        return True

    def update(self, score: float | None, now: float, active: bool = True) -> bool:
        """Feed the completion score of the step at ``now`` (seconds); True when the goal advanced."""
        self.score = None if score is None else float(score)
        if not active or self.finished or score is None or not math.isfinite(float(score)):
            self._above_since = None
            return False
        if score < self.threshold or (self._since is not None and now - self._since < self.refractory - 1e-9):
            self._above_since = None
            return False
        if self._above_since is None:
            self._above_since = float(now)
        if now - self._above_since >= self.debounce - 1e-9:
            return self.advance(now, "model")
        return False
