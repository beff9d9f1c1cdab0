"""scripts/cuda_check.py, the device check a GPU machine runs first, run here with both sides on the CPU."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

pytestmark = pytest.mark.slow


def test_the_device_check_finds_float32_equal_and_bf16_close_on_the_cpu(tmp_path):
    import cuda_check

    r = cuda_check.main(["--device", "cpu", "--out", str(tmp_path)])
    assert r["passed"] and json.loads((tmp_path / "cuda_check.json").read_text()) == r
    fp32, bf16 = r["checks"]["fp32"]["figures"], r["checks"]["bf16"]["figures"]
    assert fp32 == {"cosine": 1.0, "pretrain_loss": 0.0, "train_loss": 0.0, "recall_points": 0.0}  # deterministic
    assert bf16["cosine"] < 1.0 and bf16["train_loss"] > 0  # bf16 ran, and the check sees it differ
    assert r["reference_recall_t2i"]["1"] > 10  # trained models: the recall it compares means something
    assert r["compile"] is False and not r["checks"]["fp32"]["compiled"]  # auto: the CPU's passes are not compiled
