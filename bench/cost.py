"""What each upgrade method costs from scratch (the paper's Table 6), as JSON.

    python bench/cost.py --methods xbt base --device cpu

Each method runs bench/quality.py in its own process with an empty embedding
cache, so the wall time includes every embedding the method needs (XBT: the
text corpus by the new and the old text encoders; the Eqn. 6 baselines: the
old model on the pairs' images and captions) and the peak RSS is that
method's alone. Reported per method: wall time split into embedding, φ
pretraining and training; trainable parameters; peak RSS; the samples each
stage used. The goal (issue 5): XBT costs at most half of Base.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_RATIO = 0.5


def run_method(method: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"xbt-cost-{method}-") as tmp:
        out = Path(tmp) / "q.json"
        cmd = [sys.executable, str(ROOT / "bench" / "quality.py"), "--methods", method, "--seeds", "0",
               "--old", args.old, "--new", args.new, "--data", args.data, "--cache", str(Path(tmp) / "cache"),
               "--device", args.device, "--json-out", str(out), "--corpus-limit", str(args.corpus_limit),
               "--pairs-limit", str(args.pairs_limit), *[x for kv in args.set for x in ("--set", kv)]]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        wall = time.perf_counter() - t0
        res = json.loads(out.read_text())
    r = res["runs"][0]
    t = r["timings_s"]
    # Milliseconds kept: a tiny run's φ pretraining takes a few of them, and 0.0 would read as "did not run".
    return {"method": method, "embed_s": round(t.get("embed", 0.0), 3), "pretrain_s": round(t.get("pretrain", 0.0), 3),
            "train_s": round(t.get("train", 0.0), 3), "upgrade_s": round(sum(t.values()), 3),
            "process_s": round(wall, 1), "trainable_params": r["trainable_params"], "peak_rss_mb": r["peak_rss_mb"],
            "samples": {"corpus_texts": res["corpus"] if method == "xbt" else 0, "pairs": res["pairs"],
                        "old_model_images": 0 if method == "xbt" else res["pairs"]},
            "new_old_t2i_r1": r["recall"]["t2i"]["new/old"]["1"], "new_old_i2t_r1": r["recall"]["i2t"]["new/old"]["1"],
            "machine": res.get("device", args.device)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["xbt", "base"])
    ap.add_argument("--old", default="zoo/old")
    ap.add_argument("--new", default="zoo/new")
    ap.add_argument("--data", default=".state/world-0")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--corpus-limit", type=int, default=0, help="smoke runs only: fewer corpus captions")
    ap.add_argument("--pairs-limit", type=int, default=0, help="smoke runs only: fewer pair images")
    ap.add_argument("--set", action="append", default=[], help="config override passed to bench/quality.py")
    args = ap.parse_args()
    rows = []
    for m in args.methods:
        rows.append(run_method(m, args))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    by = {r["method"]: r for r in rows}
    result = {"bench": "cost", "rows": rows, "goal_ratio": GOAL_RATIO}
    if "xbt" in by and "base" in by:
        result["xbt_over_base"] = round(by["xbt"]["upgrade_s"] / by["base"]["upgrade_s"], 2)
        result["goal_met"] = result["xbt_over_base"] <= GOAL_RATIO
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
