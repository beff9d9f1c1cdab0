"""How sure is the gate? A paired bootstrap of the Eqn. 2 margins.

Eqn. 2 compares two recalls on one eval set: new/old against old/old. A margin
of a tenth of a point is a handful of queries, so the report gives each gate
check its margin (new/old - old/old, in points) with a bootstrap interval and
the share of resamples in which the upgrade wins. The gate itself stays the
strict comparison of CONTRACT.md; this says how much a pass or a fail means.

The queries are resampled, the gallery stays the eval set. The unit is the eval
*image*: t2i queries (captions) of one image share it and are not independent,
so an image is drawn with all its captions. Both cases are scored on the same
draw (paired), which is what makes a small margin measurable at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .evaluate import Side
from .gate import DIRECTIONS, GATE_KS
from .recall import query_ranks

N_BOOT = 2000
LEVEL = 0.95
BOOT_CELLS = 4_000_000  # resampled image slots held at once (32 MB of int64)


def _hits_per_image(ranks: torch.Tensor, owner: torch.Tensor, n_images: int, k: int) -> torch.Tensor:
    """Number of hits at k among each image's queries, (Ni,)."""
    return torch.zeros(n_images, dtype=torch.float64).index_add_(0, owner, (ranks.cpu() < k).double())


def gate_margins(
    upgraded: Side,
    old: Side,
    caption_image: torch.Tensor,
    ks: Sequence[int] = GATE_KS,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
) -> dict:
    """-> {"t2i": {"1": {"margin", "low", "high", "p_better"}, ...}, "i2t": {...}, "n_boot", "level", "unit"}.

    margin: new/old - old/old recall in points on the eval set as it is; low/high:
    the central `level` interval of the same difference over `n_boot` resamples
    of the eval images; p_better: the share of resamples where new/old > old/old.
    """
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"gate_margins: n_boot must be >= 1 and level in (0, 1), got {n_boot}, {level}")
    caption_image = caption_image.long().cpu()
    n_images = len(old.image)
    ranks = {  # (direction, case) -> per-query ranks; t2i queries are captions, i2t queries images
        ("t2i", "new"): query_ranks(upgraded.text, old.image, caption_image, "t2i"),
        ("t2i", "old"): query_ranks(old.text, old.image, caption_image, "t2i"),
        ("i2t", "new"): query_ranks(old.text, upgraded.image, caption_image, "i2t"),
        ("i2t", "old"): query_ranks(old.text, old.image, caption_image, "i2t"),
    }
    owners = {"t2i": caption_image, "i2t": torch.arange(n_images)}
    queries = {d: torch.bincount(owners[d], minlength=n_images).double() for d in DIRECTIONS}  # (Ni,) each
    deltas = {
        (d, k): _hits_per_image(ranks[d, "new"], owners[d], n_images, k)
        - _hits_per_image(ranks[d, "old"], owners[d], n_images, k)
        for d in DIRECTIONS
        for k in ks
    }  # (Ni,)
    boots = {key: [] for key in deltas}
    gen = torch.Generator().manual_seed(seed)
    step = max(1, BOOT_CELLS // n_images)  # resamples per chunk: bounded memory on a large eval set
    for start in range(0, n_boot, step):
        draws = torch.randint(n_images, (min(step, n_boot - start), n_images), generator=gen)  # (B, Ni)
        per_draw = {d: queries[d][draws].sum(1) for d in DIRECTIONS}  # (B,)
        for (d, k), delta in deltas.items():
            boots[d, k].append(100.0 * delta[draws].sum(1) / per_draw[d])  # (B,)
    tail = (1.0 - level) / 2
    out: dict = {"n_boot": n_boot, "level": level, "unit": "eval image"}
    for (d, k), delta in deltas.items():
        boot = torch.cat(boots[d, k])  # (n_boot,)
        low, high = torch.quantile(boot, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
        out.setdefault(d, {})[str(int(k))] = {
            "margin": round(100.0 * delta.sum().item() / queries[d].sum().item(), 2),
            "low": round(low, 2),
            "high": round(high, 2),
            "p_better": round((boot > 0).double().mean().item(), 3),
        }
    return out


def format_margins(margins: dict) -> str:
    """One line per direction: margin [interval] per K, for the CLI and the markdown report."""
    pct = round(100 * margins["level"])
    lines = [
        f"gate margins, new/old - old/old in points ({pct}% interval over {margins['n_boot']} "
        f"resamples of the {margins['unit']}s):"
    ]
    for d in DIRECTIONS:
        cells = [f"R@{k} {m['margin']:+.2f} [{m['low']:+.2f}, {m['high']:+.2f}]" for k, m in margins[d].items()]
        lines.append(f"  {d}: " + "   ".join(cells))
    return "\n".join(lines)
