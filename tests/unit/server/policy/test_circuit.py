"""The circuit breaker: a failing engine is left alone, one trial call per cooldown, closed on success."""

from __future__ import annotations

from server.policy.circuit import Circuit


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_it_opens_after_consecutive_failures_and_denies_without_asking() -> None:
    clock = Clock()
    circuit = Circuit(failures=3, cooldown=1.0, clock=clock)
    for _ in range(2):
        assert circuit.allow()
        circuit.failed("timeout")
    assert circuit.state == "closed"
    circuit.failed("timeout")
    assert (circuit.state, circuit.opens) == ("open", 1)
    assert not circuit.allow()
    assert "circuit open after 3 failures (timeout)" in circuit.describe()


def test_a_success_resets_the_count() -> None:
    circuit = Circuit(failures=2, cooldown=1.0, clock=Clock())
    circuit.failed("x")
    circuit.succeeded()
    circuit.failed("x")
    assert circuit.state == "closed"


def test_half_open_lets_one_trial_through_and_its_result_decides() -> None:
    clock = Clock()
    circuit = Circuit(failures=1, cooldown=1.0, clock=clock)
    circuit.failed("refused")
    clock.now = 1.0
    assert circuit.allow()  # the trial
    assert circuit.state == "half_open"
    assert not circuit.allow()  # everyone else is still denied fast
    circuit.failed("refused")
    assert (circuit.state, circuit.opens) == ("open", 2)
    clock.now = 2.0
    assert circuit.allow()
    circuit.succeeded()
    assert circuit.state == "closed"
    assert circuit.allow()


def test_a_trial_that_never_reports_is_replaced_after_a_cooldown() -> None:
    clock = Clock()
    circuit = Circuit(failures=1, cooldown=1.0, clock=clock)
    circuit.failed("stalled")
    clock.now = 1.0
    assert circuit.allow()
    clock.now = 1.5
    assert not circuit.allow()
    clock.now = 2.0
    assert circuit.allow()
