"""`--method auto`: which candidate an upgrade keeps, decided on the validation pairs alone.

Candidates run cheapest first (`registry.by_cost`). The first eligible one that passes
Eqn. 2 on validation with every check's 95% interval above zero is kept, and no costlier
one runs; when none does, the eligible one with the largest smallest margin is kept.
"""

from __future__ import annotations

from ..gate import DIRECTIONS, GATE_KS


def checks(margins: dict, ks=GATE_KS) -> list[dict]:
    """The gate's checks of a validation margins report (xbtcore.margins.gate_margins), each with its direction and K."""
    return [{"direction": d, "k": k, **margins[d][str(k)]} for d in DIRECTIONS for k in ks]


def min_margin(margins: dict, ks=GATE_KS) -> float:
    """The smallest new/old - old/old margin, in points, over the gate's checks."""
    return min(c["margin"] for c in checks(margins, ks))


def passes_clearly(margins: dict, ks=GATE_KS) -> bool:
    """Eqn. 2 holds at every check with its bootstrap interval above zero."""
    return all(c["margin"] > 0 and c["low"] > 0 for c in checks(margins, ks))


def choose(candidates: list[dict], ks=GATE_KS) -> dict:
    """candidates: in the order they ran, each {"method", "eligible", "margins"} (margins None: not run).
    -> {"method", "reason"}."""
    ran = [c for c in candidates if c["eligible"] and c["margins"] is not None]
    if not ran:
        raise ValueError("no eligible candidate ran: nothing to choose from")
    for c in ran:
        if passes_clearly(c["margins"], ks):
            return {"method": c["method"], "reason": f"the cheapest candidate that passes Eqn. 2 on the validation "
                    f"pairs with every 95% interval above zero (smallest margin {min_margin(c['margins'], ks):+.2f})"}
    best = max(ran, key=lambda c: min_margin(c["margins"], ks))
    return {"method": best["method"], "reason": "no candidate passed Eqn. 2 on the validation pairs with every 95% "
            f"interval above zero; the largest smallest margin ({min_margin(best['margins'], ks):+.2f} points)"}
