from __future__ import annotations

import itertools

import pytest

from gateway.engine.state import ALLOWED, EngineState, IllegalTransition, StateMachine

S = EngineState


def test_lifecycle_and_listener() -> None:
    seen: list[tuple[S, S]] = []
    sm = StateMachine(on_change=lambda a, b: seen.append((a, b)))
    sm.transition(S.STOPPED, S.STARTING)
    sm.transition(S.STARTING, S.READY)
    sm.transition(S.READY, S.STOPPING)
    sm.transition(S.STOPPING, S.STOPPED)
    assert seen == [(S.STOPPED, S.STARTING), (S.STARTING, S.READY), (S.READY, S.STOPPING), (S.STOPPING, S.STOPPED)]


@pytest.mark.parametrize(("source", "target"), list(itertools.product(S, S)))
def test_only_table_moves_are_accepted(source: S, target: S) -> None:
    sm = StateMachine()
    sm._state = source  # put the machine in the state under test
    if target in ALLOWED[source]:
        sm.transition(source, target)
        assert sm.state is target
    else:
        with pytest.raises(IllegalTransition):
            sm.transition(source, target)
        assert sm.state is source


def test_compare_and_swap_refuses_a_stale_expectation() -> None:
    sm = StateMachine()
    sm.transition(S.STOPPED, S.STARTING)
    with pytest.raises(IllegalTransition):
        sm.transition(S.STOPPED, S.STARTING)  # a second start that did not see the first
    sm.transition(frozenset({S.STARTING, S.READY}), S.FAILED)
    assert sm.state is S.FAILED


def test_crash_then_restart_is_allowed_but_ready_cannot_restart_directly() -> None:
    assert S.FAILED in ALLOWED[S.READY]
    assert S.STARTING in ALLOWED[S.FAILED]
    assert S.STARTING not in ALLOWED[S.READY]
