"""`--method auto`: which candidate an upgrade keeps, decided on the validation pairs alone.

Candidates run cheapest first (`registry.by_cost`). The first eligible one that passes
Eqn. 2 on validation with every check's 95% interval above zero, and keeps new/new within
NEW_NEW_SLACK points R@1 of the original new model there (gallery items embedded by the
upgraded model must search about as well as after a backfill), is kept, and no costlier one
runs; when none does, the eligible one with the largest smallest margin is kept.
"""

from __future__ import annotations

from ..gate import DIRECTIONS, GATE_KS

NEW_NEW_SLACK = 1.0  # points of R@1, each direction, new/new may sit under orig-new/new


def checks(margins: dict, ks=GATE_KS) -> list[dict]:
    """The gate's checks of a validation margins report (xbtcore.margins.gate_margins), each with its
    direction and K."""
    return [{"direction": d, "k": k, **margins[d][str(k)]} for d in DIRECTIONS for k in ks]


def min_margin(margins: dict, ks=GATE_KS) -> float:
    """The smallest new/old - old/old margin, in points, over the gate's checks."""
    return min(c["margin"] for c in checks(margins, ks))


def passes_clearly(margins: dict, ks=GATE_KS) -> bool:
    """Eqn. 2 holds at every check with its bootstrap interval above zero."""
    return all(c["margin"] > 0 and c["low"] > 0 for c in checks(margins, ks))


def new_new_gap(recall: dict) -> float:
    """How far new/new sits under orig-new/new, in points R@1, the worse direction (negative: above it).
    Rounded as the recalls are (two decimals): 32.20 - 31.20 is 1.00, not 1.0000000000000036."""
    return round(max(recall[d]["orig-new/new"]["1"] - recall[d]["new/new"]["1"] for d in DIRECTIONS), 2)


def _gap_words(gap: float) -> str:
    return f"{gap:.2f} under" if gap > 0 else f"{-gap:.2f} above" if gap < 0 else "level with it"


def qualifies(candidate: dict, ks=GATE_KS) -> bool:
    """A run candidate passes Eqn. 2 on validation with every interval above zero and keeps new/new."""
    return (
        candidate["margins"] is not None
        and passes_clearly(candidate["margins"], ks)
        and new_new_gap(candidate["recall"]) <= NEW_NEW_SLACK
    )


def choose(candidates: list[dict], ks=GATE_KS) -> dict:
    """candidates: in the order they ran, each {"method", "eligible", "margins", "recall"} (margins None: not
    run; recall: the validation cases). -> {"method", "reason"}."""
    ran = [c for c in candidates if c["eligible"] and c["margins"] is not None]
    if not ran:
        raise ValueError("no eligible candidate ran: nothing to choose from")
    for c in ran:
        if qualifies(c, ks):
            return {
                "method": c["method"],
                "reason": f"the cheapest candidate that passes Eqn. 2 on the validation "
                f"pairs with every 95% interval above zero (smallest margin {min_margin(c['margins'], ks):+.2f}) "
                f"and keeps new/new within {NEW_NEW_SLACK:g} point R@1 of the new model "
                f"({_gap_words(new_new_gap(c['recall']))})",
            }
    best = max(ran, key=lambda c: min_margin(c["margins"], ks))
    return {
        "method": best["method"],
        "reason": f"no {'eligible ' if any(not c['eligible'] for c in candidates) else ''}candidate passed "
        "Eqn. 2 on the validation pairs with every 95% interval above zero while keeping new/new; the largest "
        "smallest margin "
        f"({min_margin(best['margins'], ks):+.2f} points)",
    }
