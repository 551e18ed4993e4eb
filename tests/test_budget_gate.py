"""The budget gate: which estimate decides a configuration, and what it remembers (no model needed)."""

from __future__ import annotations

from autopeft.budget import ANALYTIC_REJECT, ANALYTIC_UNDER, BudgetGate
from autopeft.memory import MemoryEstimate

BUDGET = 1000


def estimate(total: int, level: str = "analytic") -> MemoryEstimate:
    return MemoryEstimate(weights=total // 2, gradients=0, optimizer_state=0, activations=total - total // 2,
                          level=level)


class Tracer:
    """Stands in for the traced estimator: returns `factor` x the analytic total and counts its calls."""

    def __init__(self, analytic: MemoryEstimate, factor: float) -> None:
        self.analytic, self.factor, self.calls = analytic, factor, 0

    def __call__(self) -> MemoryEstimate:
        self.calls += 1
        return estimate(round(self.analytic.total * self.factor), "traced")


def test_far_above_the_budget_the_analytic_estimate_rejects_without_tracing() -> None:
    gate, analytic = BudgetGate(), estimate(int(ANALYTIC_REJECT * BUDGET) + 1)
    tracer = Tracer(analytic, 0.5)
    assert gate.decide(analytic, BUDGET, "a", "lora", tracer) is analytic
    assert tracer.calls == 0


def test_anything_that_could_fit_is_traced_and_the_trace_decides() -> None:
    gate, analytic = BudgetGate(), estimate(600)  # the analytic figure fits, the real step would not
    tracer = Tracer(analytic, 1.9)
    decided = gate.decide(analytic, BUDGET, "a", "lora", tracer)
    assert decided.level == "traced" and decided.total > BUDGET and tracer.calls == 1


def test_a_configuration_differing_only_in_what_memory_ignores_is_not_traced_again() -> None:
    gate, analytic = BudgetGate(), estimate(900)
    tracer = Tracer(analytic, 1.2)
    first = gate.decide(analytic, BUDGET, "same key", "lora", tracer)
    assert gate.decide(analytic, BUDGET, "same key", "lora", tracer) is first
    assert tracer.calls == 1 and gate.traces == 1


def test_a_trace_calibrates_its_family_so_clear_rejections_skip_the_trace() -> None:
    gate = BudgetGate()
    small = estimate(700)
    gate.decide(small, BUDGET, "small", "lora-adamw", Tracer(small, 1.4))  # analytic runs 40% low here
    larger = estimate(1000)  # analytic says it just fits; calibrated: 1400 > 1.2 x budget
    tracer = Tracer(larger, 1.4)
    decided = gate.decide(larger, BUDGET, "larger", "lora-adamw", tracer)
    assert decided.level == "calibrated" and decided.total == 1400 and tracer.calls == 0
    assert decided.total == sum(decided.parts().values())
    # Another family has no calibration: traced.
    other = Tracer(larger, 0.8)
    assert gate.decide(larger, BUDGET, "other", "ia3-sgd", other).level == "traced" and other.calls == 1


def test_calibration_never_admits_a_configuration_untraced() -> None:
    gate = BudgetGate()
    first = estimate(500)
    gate.decide(first, BUDGET, "first", "lora", Tracer(first, 0.5))  # analytic runs high in this family
    fits = estimate(900)  # calibrated 450: well inside, but admission still needs the trace
    tracer = Tracer(fits, 0.5)
    assert gate.decide(fits, BUDGET, "fits", "lora", tracer).level == "traced" and tracer.calls == 1


def test_the_quick_extrapolated_trace_rejects_without_the_full_one() -> None:
    gate, analytic = BudgetGate(), estimate(800)
    full, quick = Tracer(analytic, 1.5), Tracer(analytic, 1.5)
    decided = gate.decide(analytic, BUDGET, "a", "lora", full, quick=[quick])
    assert decided.total == 1200 and quick.calls == 1 and full.calls == 0
    assert gate.decide(analytic, BUDGET, "a", "lora", full, quick=[quick]) is decided  # remembered


def test_quick_estimates_are_tried_cheapest_first_until_one_rejects() -> None:
    gate, analytic = BudgetGate(), estimate(800)
    forward, both, full = Tracer(analytic, 0.9), Tracer(analytic, 1.5), Tracer(analytic, 1.5)
    assert gate.decide(analytic, BUDGET, "a", "lora", full, quick=[forward, both]).total == 1200
    assert (forward.calls, both.calls, full.calls) == (1, 1, 0)
    decisive, never = Tracer(analytic, 1.5), Tracer(analytic, 1.5)
    gate.decide(analytic, BUDGET, "b", "lora", full, quick=[decisive, never])
    assert (decisive.calls, never.calls, full.calls) == (1, 0, 0)


def test_admission_always_takes_the_full_trace() -> None:
    gate, analytic = BudgetGate(), estimate(800)
    full, quick = Tracer(analytic, 0.9), Tracer(analytic, 0.9)
    assert gate.decide(analytic, BUDGET, "a", "lora", full, quick=[quick]).total == 720
    assert quick.calls == 1 and full.calls == 1


def test_a_configuration_that_surely_fits_skips_the_quick_trace() -> None:
    gate, analytic = BudgetGate(), estimate(int(BUDGET / ANALYTIC_UNDER) - 1)
    full, quick = Tracer(analytic, 2.0), Tracer(analytic, 2.0)
    gate.decide(analytic, BUDGET, "a", "lora", full, quick=[quick])
    assert quick.calls == 0 and full.calls == 1
