"""eqn2_gate and no_regression_gate on hand-made recall reports."""

import pytest

from xbtcore.gate import GateResult, eqn2_gate, no_regression_gate


def case(r1, r5, r10, r50=90.0):
    return {"1": r1, "5": r5, "10": r10, "50": r50}


def report(**cases):
    """{"t2i": cases, "i2t": cases}; cases given as name_with_underscores=(t2i, i2t)."""
    out = {"t2i": {}, "i2t": {}}
    for name, (t2i, i2t) in cases.items():
        out["t2i"][name.replace("_", "/")] = t2i
        out["i2t"][name.replace("_", "/")] = i2t
    return out


OLD = case(10.0, 30.0, 40.0)


def test_eqn2_passes_when_new_old_beats_old_old_everywhere():
    better = case(11.0, 31.0, 40.5)
    result = eqn2_gate(report(old_old=(OLD, OLD), new_old=(better, better)))
    assert result.passed
    assert result.to_dict() == {"passed": True, "criterion": "eqn2", "ks": [1, 5, 10], "failures": []}


def test_eqn2_fails_with_exact_failures():
    t2i = case(12.0, 29.5, 41.0)
    i2t = case(9.0, 31.0, 39.0, r50=10.0)  # K=50 is not gated
    result = eqn2_gate(report(old_old=(OLD, OLD), new_old=(t2i, i2t)))
    assert not result.passed
    assert result.failures == [["t2i", 5, 29.5, 30.0], ["i2t", 1, 9.0, 10.0], ["i2t", 10, 39.0, 40.0]]
    assert result.to_dict()["failures"] == result.failures


def test_eqn2_is_strict():
    result = eqn2_gate(report(old_old=(OLD, OLD), new_old=(case(11.0, 30.0, 41.0), case(11.0, 31.0, 41.0))))
    assert not result.passed
    assert result.failures == [["t2i", 5, 30.0, 30.0]]


def test_eqn2_custom_ks():
    new = case(11.0, 31.0, 41.0, r50=80.0)
    result = eqn2_gate(report(old_old=(OLD, OLD), new_old=(new, new)), ks=(1, 50))
    assert result.ks == [1, 50]
    assert result.failures == [["t2i", 50, 80.0, 90.0], ["i2t", 50, 80.0, 90.0]]


def test_missing_case_is_named():
    with pytest.raises(ValueError, match="'new/old'"):
        eqn2_gate(report(old_old=(OLD, OLD)))
    with pytest.raises(ValueError, match="'prev/old'"):
        no_regression_gate(report(old_old=(OLD, OLD), new_old=(OLD, OLD)))


def test_missing_k_is_named():
    partial = {"1": 11.0, "5": 31.0}
    with pytest.raises(ValueError, match="K=10"):
        eqn2_gate(report(old_old=(OLD, OLD), new_old=(partial, partial)))


def test_no_regression_allows_equal_and_catches_drops():
    champion = case(20.0, 40.0, 50.0)
    equal = no_regression_gate(report(prev_old=(champion, champion), new_old=(champion, champion)))
    assert equal.passed and equal.criterion == "no-regression"
    worse = no_regression_gate(report(prev_old=(champion, champion), new_old=(champion, case(20.0, 39.99, 50.0))))
    assert not worse.passed
    assert worse.to_dict() == {
        "passed": False,
        "criterion": "no-regression",
        "ks": [1, 5, 10],
        "failures": [["i2t", 5, 39.99, 40.0]],
    }


def test_gate_result_is_frozen():
    with pytest.raises(AttributeError):
        GateResult(passed=True).passed = False


def test_failing_checks_read_as_one_line_each():
    from xbtcore.gate import describe_failures

    assert describe_failures([["t2i", 1, 30.1, 31.2], ["i2t", 10, 80.0, 80.0]]) == [
        "t2i R@1 new/old 30.1 <= old/old 31.2",
        "i2t R@10 new/old 80.0 <= old/old 80.0",
    ]
    assert describe_failures([["i2t", 5, 45.0, 46.0]], "no-regression") == ["i2t R@5 new/old 45.0 < prev/old 46.0"]
