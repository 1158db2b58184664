"""The engine's lifecycle as an explicit state machine.

Every change of state goes through :meth:`StateMachine.transition`, a compare-and-swap against the
table below, so a stray stop during a start, or a second start racing the first, is refused instead
of silently corrupting the lifecycle's view of the process.
"""

from __future__ import annotations

import enum
from collections.abc import Callable


class EngineState(str, enum.Enum):  # noqa: UP042  # as it was: a StrEnum would change what str() gives
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


ALLOWED: dict[EngineState, frozenset[EngineState]] = {
    EngineState.STOPPED: frozenset({EngineState.STARTING}),
    # A start ends ready, failed (exit, timeout, no program), or is interrupted by a stop.
    EngineState.STARTING: frozenset({EngineState.READY, EngineState.FAILED, EngineState.STOPPING}),
    # A ready engine is stopped on purpose, or fails by crashing.
    EngineState.READY: frozenset({EngineState.STOPPING, EngineState.FAILED}),
    EngineState.STOPPING: frozenset({EngineState.STOPPED}),
    # After a failure the next request retries (once the backoff allows); a stop just clears it.
    EngineState.FAILED: frozenset({EngineState.STARTING, EngineState.STOPPED}),
}


class IllegalTransition(RuntimeError):
    """A move the table does not allow: a bug in the lifecycle, never a client's fault."""


class StateMachine:
    """Holds the current state; ``on_change`` hears every accepted transition."""

    def __init__(self, on_change: Callable[[EngineState, EngineState], None] | None = None) -> None:
        self._state = EngineState.STOPPED
        self._on_change = on_change

    @property
    def state(self) -> EngineState:
        return self._state

    def can(self, target: EngineState) -> bool:
        return target in ALLOWED[self._state]

    def transition(self, expected: EngineState | frozenset[EngineState], target: EngineState) -> None:
        """Move to ``target`` if the current state is ``expected`` (or one of them) and the table allows it."""
        allowed_from = expected if isinstance(expected, frozenset) else frozenset({expected})
        if self._state not in allowed_from or target not in ALLOWED[self._state]:
            raise IllegalTransition(f"engine state {self._state.value} -> {target.value} refused")
        previous, self._state = self._state, target
        if self._on_change is not None:
            self._on_change(previous, target)
