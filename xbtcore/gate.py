"""The upgrade gate: Eqn. 2 of the XBT paper as a pure function of a recall report.

Eqn. 2 asks that the upgraded model's queries against the old gallery beat the
old model on both sides: M(w̄_new, v_old) > M(w_old, v_old) for text queries and
M(v̄_new, w_old) > M(v_old, w_old) for image queries. With M = Recall@K that is
`new/old` > `old/old` for every K in both directions (docs/contract.md).
A continual chain adds the no-regression check: the new link's queries must do
at least as well as the champion link's (`prev/old`) against the same gallery.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

DIRECTIONS = ("t2i", "i2t")
GATE_KS = (1, 5, 10)


@dataclass(frozen=True)
class GateResult:
    """A gate verdict; `failures` lists each failing [direction, K, candidate, reference]."""

    passed: bool
    criterion: str = "eqn2"
    ks: list[int] = field(default_factory=lambda: list(GATE_KS))
    failures: list[list] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The report.json `gate` entry."""
        return {
            "passed": self.passed,
            "criterion": self.criterion,
            "ks": list(self.ks),
            "failures": [list(f) for f in self.failures],
        }


def eqn2_gate(
    recall: dict,
    ks: Sequence[int] = GATE_KS,
    query_case: str = "new/old",
    reference_case: str = "old/old",
) -> GateResult:
    """Eqn. 2: passes when query_case beats reference_case strictly at every K, both directions.

    recall is the report's {"t2i": {case: {"1": r1, ...}}, "i2t": {...}}. An equal
    recall fails: the upgrade must improve on the system it replaces.
    """
    failures = _failures(recall, ks, query_case, reference_case, lambda cand, ref: cand > ref)
    return GateResult(passed=not failures, criterion="eqn2", ks=[int(k) for k in ks], failures=failures)


def no_regression_gate(
    recall: dict,
    champion_case: str = "prev/old",
    candidate_case: str = "new/old",
    ks: Sequence[int] = GATE_KS,
) -> GateResult:
    """Continual chains: passes when candidate_case >= champion_case at every K, both directions."""
    failures = _failures(recall, ks, candidate_case, champion_case, lambda cand, ref: cand >= ref)
    return GateResult(passed=not failures, criterion="no-regression", ks=[int(k) for k in ks], failures=failures)


FAILURE_TESTS = {"eqn2": "<= old/old", "no-regression": "< prev/old"}  # what a failing check's numbers show
CRITERION_NAMES = {"eqn2": "Eqn. 2", "no-regression": "no-regression"}  # how a message names each


def describe_failures(failures: list[list], criterion: str = "eqn2") -> list[str]:
    """One line per failing [direction, K, candidate, reference]: 't2i R@1 new/old 30.1 <= old/old 31.2'."""
    return [f"{d} R@{k} new/old {a} {FAILURE_TESTS[criterion]} {b}" for d, k, a, b in failures]


def describe_verdict(verdict: dict) -> list[str]:
    """Every failing check of a verdict (criterion -> GateResult.to_dict(), and "passed"), a line each."""
    return [
        line
        for v in verdict.values()
        if isinstance(v, dict)
        for line in describe_failures(v["failures"], v["criterion"])
    ]


def _failures(recall: dict, ks: Sequence[int], candidate: str, reference: str, holds) -> list[list]:
    """Each [direction, K, candidate recall, reference recall] where holds(...) is false."""
    if not ks:
        raise ValueError("gate: ks is empty; name the K values the gate checks")
    failures = []
    for direction in DIRECTIONS:
        if direction not in recall:
            raise ValueError(f"gate: recall has no {direction!r} direction")
        for case in (candidate, reference):
            if case not in recall[direction]:
                raise ValueError(f"gate: recall[{direction!r}] has no case {case!r}; evaluate it first")
        for k in ks:
            k = int(k)
            for case in (candidate, reference):
                if str(k) not in recall[direction][case]:
                    raise ValueError(f"gate: recall[{direction!r}][{case!r}] has no K={k}")
            cand, ref = recall[direction][candidate][str(k)], recall[direction][reference][str(k)]
            if not holds(cand, ref):
                failures.append([direction, k, cand, ref])
    return failures
