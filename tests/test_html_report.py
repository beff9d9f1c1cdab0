"""The HTML report: the renderer on synthetic data, the data behind its map and examples, the task, MLflow logging."""

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tasks.html_report import examples_of, map_panels, render_report
from xbtcore.backfill import BACKFILL_ORDER
from xbtcore.evaluate import Side
from xbtcore.inspect_sample import pca_2d, report_sample

KS = ("1", "5", "10", "50")
CASES = ("old/old", "new/old", "new/new", "orig-new/new")
EVIL = "a red <script>alert('x')</script> & a blue square"


def _report(failures=()):
    recall = {d: {c: {k: 10.0 + i + int(k) for k in KS} for i, c in enumerate(CASES)} for d in ("t2i", "i2t")}
    gate = {"passed": not failures, "criterion": "eqn2", "ks": [1, 5, 10], "failures": [list(f) for f in failures]}
    return {
        "method": "xbt",
        "old": "zoo/old",
        "new": "zoo/<new>",
        "recall": recall,
        "gate": gate,
        "counts": {"corpus": 1234, "pairs": 50, "eval_images": 12, "eval_captions": 24},
        "timings_s": {"extract": 1.0, "embed": 2.0, "pretrain": 3.0, "train": 150.0, "evaluate": 0.5},
    }


def _sides(n_images=12, per_image=2, seed=0):
    """Three random 'models' of an eval set where caption c belongs to image c // per_image."""
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)

    caption_image = torch.arange(n_images).repeat_interleave(per_image)
    old, upgraded = (
        Side(unit(n_images * per_image, 8), unit(n_images, 8)),
        Side(unit(n_images * per_image, 8), unit(n_images, 8)),
    )
    orig = Side(unit(n_images * per_image, 6), unit(n_images, 6))
    return old, upgraded, orig, caption_image


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buf, format="PNG")
    return buf.getvalue()


def _examples(n_queries, k):
    def hit(i):
        return {"image": f"img-{i}", "score": 0.5, "is_gt": i == 0, "png": _png((i * 20, 0, 0))}

    return [
        {
            "caption": EVIL if q == 0 else f"caption {q}",
            "gt_image": "img-0",
            "gt_png": _png((0, 0, 0)),
            "rows": [
                {"label": "upgraded new model", "rank": 1, "hits": [hit(i) for i in range(k)]},
                {"label": "old model", "rank": 7, "hits": [hit(i + 1) for i in range(k)]},
            ],
        }
        for q in range(n_queries)
    ]


def test_report_sample_matches_brute_force():
    old, upgraded, orig, caption_image = _sides()
    s = report_sample(old, upgraded, orig, caption_image, n_map=5, n_queries=4, k=3)
    # Map: distinct images, each with its first caption, rows taken from the right side.
    assert len(set(s["map_images"].tolist())) == 5
    assert (caption_image[s["map_captions"]] == s["map_images"]).all()
    assert (s["map_captions"] == s["map_images"] * 2).all()  # the first of the two captions
    assert torch.equal(s["w_bar"], upgraded.text[s["map_captions"]]) and torch.equal(
        s["v_new"], orig.image[s["map_images"]]
    )
    # Examples: top-k and the own image's rank, by sorting every score.
    for name, side in (("new", upgraded), ("old", old)):
        for q, c in enumerate(s["query_captions"].tolist()):
            scores = [float(side.text[c] @ old.image[i]) for i in range(old.image.shape[0])]
            order = sorted(range(len(scores)), key=lambda i: -scores[i])
            assert s[f"top_{name}"][q].tolist() == order[:3]
            assert int(s[f"rank_{name}"][q]) == order.index(int(caption_image[c])) + 1
            assert s[f"score_{name}"][q].tolist() == pytest.approx([scores[i] for i in order[:3]], abs=1e-6)


def test_pca_2d_keeps_the_two_largest_variances():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 5, generator=g) * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1]) + 7.0
    xy, share = pca_2d(x)
    eig = torch.linalg.eigvalsh(torch.cov(x.double().T)).flip(0)  # descending
    assert xy.var(0).double() == pytest.approx(eig[:2], rel=1e-4)
    assert share == pytest.approx((eig[:2] / eig.sum()).tolist(), rel=1e-4)
    assert torch.equal(pca_2d(x)[0], xy)  # the same data, the same picture


def test_render_has_every_section_and_escapes_what_it_shows():
    old, upgraded, orig, caption_image = _sides()
    sample = report_sample(old, upgraded, orig, caption_image, n_map=7)
    report = _report(failures=[("t2i", 5, 12.0, 13.5), ("i2t", 1, 9.0, 9.5)])
    page = render_report(report, map_panels(sample), _examples(3, 5), n_map_points=7)

    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for title in (
        "Recall per case and K",
        "Embedding map",
        "A. old embedding space",
        "B. original new embedding space",
        "Retrieval examples",
    ):
        assert title in page
    assert "gate failed" in page
    assert "t2i R@5: new/old 12.0 &le; old/old 13.5" in page and "i2t R@1: new/old 9.0 &le; old/old 9.5" in page
    assert page.count('<td class="bad">') == 2  # the failing gate cells
    assert "2 min 30 s" in page and "1,234" in page  # timings and counts
    # Thumbnails: per query its own image and 5 hits for each of the two models.
    assert len(re.findall(r'<img class="thumb[^"]*" src="data:image/png;base64,', page)) == 3 * (1 + 2 * 5)
    # Map: one circle per image and one triangle per text of every series (A: old and upgraded, B: original new).
    panels = re.findall(r'<svg [^>]*aria-label="[AB]\. .*?</svg>', page)
    assert [(p.count("<circle "), p.count("<path ")) for p in panels] == [(2 * 7, 2 * 7), (7, 7)]
    # Nothing from the data reaches the page unescaped; nothing is fetched from outside.
    assert "<script" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; a blue" in page
    assert "zoo/&lt;new&gt;" in page
    assert not re.search(r'(src|href)="(?!data:)', page) and "http" not in page


def test_render_without_sample_or_failures():
    page = render_report(_report())
    assert "gate passed" in page and '<ul class="failures">' not in page and '<td class="bad">' not in page
    assert "the map is not available" in page and "no examples" in page and "<img" not in page


def test_gate_margins_row_under_each_recall_table():
    report = _report()
    assert "interval of &Delta;" not in render_report(report)  # older reports have no margins
    margins = {
        "n_boot": 2000,
        "level": 0.95,
        "unit": "eval image",
        **{
            d: {
                k: {"margin": 1.0, "low": -0.25 - i, "high": 2.5, "p_better": 0.9}
                for i, k in enumerate(("1", "5", "10"))
            }
            for d in ("t2i", "i2t")
        },
    }
    page = render_report({**report, "gate_margins": margins})
    assert page.count("95% interval of &Delta;") == 2
    assert page.count('<td class="muted">-1.25..+2.50</td>') == 2  # R@5 of each direction
    assert page.count("<td></td>") == 2  # R@50 is not a gate check: no interval


def test_write_report_task(tmp_path):
    from tasks.report import write_report

    n_images = 12
    captions = [EVIL if c == 0 else f"caption {c}" for c in range(2 * n_images)]
    table = pa.table(
        {
            "image": [_png((10 * (c // 2), 50, 90)) for c in range(2 * n_images)],
            "caption": captions,
            "image_id": [f"im{c // 2}" for c in range(2 * n_images)],
        }
    )
    pq.write_table(table, tmp_path / "eval.parquet")
    old, upgraded, orig, caption_image = _sides(n_images)
    sample = report_sample(old, upgraded, orig, caption_image, n_map=6, n_queries=4, k=5)
    save_file(sample, tmp_path / "sample.safetensors")
    written = write_report.fn(
        _report(), str(tmp_path / "eval.parquet"), str(tmp_path / "sample.safetensors"), str(tmp_path / "out")
    )
    assert json.loads(Path(written["json"]).read_text()) == _report()
    page = Path(written["html"]).read_text(encoding="utf-8")
    assert page.count('<img class="thumb') == 4 * (1 + 2 * 5)
    for q, c in enumerate(sample["query_captions"].tolist()):
        assert f"own image: im{c // 2}<" in page
    # The examples show the images by id, and the same thumbnails the task made from the Parquet bytes.
    ex = examples_of(
        sample,
        captions,
        [f"im{i}" for i in range(n_images)],
        lambda i: Image.open(io.BytesIO(table["image"][2 * i].as_py())),
    )
    assert [h["image"] for h in ex[0]["rows"][0]["hits"]] == [f"im{i}" for i in sample["top_new"][0].tolist()]

    no_sample = write_report.fn(
        _report(), str(tmp_path / "eval.parquet"), str(tmp_path / "missing.safetensors"), str(tmp_path / "bare")
    )
    assert "the map is not available" in Path(no_sample["html"]).read_text(encoding="utf-8")


def test_mlflow_run_logs_report_html(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("XBT_STATE_DIR", str(tmp_path / "state"))
    from tasks import registry

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "xbt_bundle.json").write_text("{}")
    report = _report()
    (tmp_path / "report.json").write_text(json.dumps(report))
    (tmp_path / "report.html").write_text(render_report(report))
    verdict = {"eqn2": report["gate"], "passed": True}
    reg = registry.register_and_promote.fn(report, report["recall"], str(bundle), "/m/old", verdict, {}, [])
    registry.attach_report.fn(reg["run_id"], [str(tmp_path / "report.json"), str(tmp_path / "report.html")])
    assert "report.html" in {a.path for a in registry.client().list_artifacts(reg["run_id"])}


def test_the_candidates_auto_ran_and_the_one_it_kept_are_shown():
    def margins(m, low):
        return {d: {k: {"margin": m, "low": low, "high": m + 1} for k in ("1", "5", "10")} for d in ("t2i", "i2t")}

    report = {
        **_report(),
        "method": "xbt-gallery",
        "timings_s": {"extract": 1.0, "train": 2.0, "total": 10.0},
        "chosen": {"method": "xbt-gallery", "reason": "the cheapest candidate that passes <clearly>"},
        "candidates": [
            {
                "method": "procrustes",
                "cost": 0,
                "eligible": True,
                "ran": True,
                "seconds": 1.5,
                "margins": margins(-3.0, -4.0),
            },
            {
                "method": "slerp-bc",
                "cost": 0,
                "eligible": False,
                "ran": True,
                "seconds": 2.0,
                "margins": margins(1.0, 0.5),
            },
            {
                "method": "xbt-gallery",
                "cost": 1,
                "eligible": True,
                "ran": True,
                "seconds": 30.0,
                "margins": margins(4.0, 2.0),
            },
            {
                "method": "xbt",
                "cost": 2,
                "eligible": True,
                "ran": False,
                "why": "a cheaper candidate passed",
                "margins": None,
            },
        ],
    }
    page = render_report(report)
    assert "Candidates, on the validation pairs" in page and "<b>xbt-gallery</b> (kept)" in page
    assert "not run: a cheaper candidate passed" in page and "not eligible" in page
    assert "&lt;clearly&gt;" in page  # escaped
    assert page.count('<td class="bad">-3.00') == 6 and page.count('<td class="ok">+4.00') == 6
    assert "start-up, world, registry, reports" in page  # 10 s total against 3 s of steps


def test_each_map_panel_has_the_variance_shares_of_its_own_space():
    g = torch.Generator().manual_seed(0)
    old = torch.nn.functional.normalize(
        torch.randn(40, 8, generator=g) * torch.tensor([4.0, 1, 1, 1, 1, 1, 1, 1]), dim=1
    )
    new = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1)
    sample = {"v_old": old[:20], "w_old": old[20:], "v_bar": old[:20], "w_bar": old[20:], "v_new": new[:20]}
    sample["w_new"] = new[20:]
    a, b = map_panels(sample)
    assert a["variance"] == pytest.approx(pca_2d(torch.cat([old, old]))[1], rel=1e-4)
    assert b["variance"] == pytest.approx(pca_2d(new)[1], rel=1e-4)
    assert a["variance"][0] > b["variance"][0] + 0.1  # one dominant axis in the old space only


def test_a_backfill_study_past_its_image_cap_runs_on_a_sample_of_the_images_with_their_captions():
    from xbtcore.evaluate import backfill_study, evaluate_cases

    old, upgraded, orig, caption_image = _sides(n_images=40, per_image=3)
    study = backfill_study(old, upgraded, orig, caption_image, random_orders=2, max_images=25)
    assert (study["images"], study["eval_images"]) == (25, 40)
    kept = np.sort(np.random.default_rng(0).choice(40, 25, replace=False))
    rows = torch.as_tensor(np.flatnonzero(np.isin(caption_image.numpy(), kept)))
    remap = {int(old_row): i for i, old_row in enumerate(kept)}
    study_sample = evaluate_cases(
        *(Side(text=s.text[rows], image=s.image[torch.as_tensor(kept)]) for s in (old, upgraded, orig)),
        torch.as_tensor([remap[int(i)] for i in caption_image[rows]]),
    )["t2i"]
    for k in ("1", "5", "10"):  # the ends are the sample's own recall: new/old and orig-new/new on 25 images
        assert study["curves"]["random"][0][k] == pytest.approx(study_sample["new/old"][k], abs=0.01)
        assert study["curves"]["random"][-1][k] == pytest.approx(study_sample["orig-new/new"][k], abs=0.01)
    assert "Measured on 25 of the 40 eval images" in render_report({**_report(), "backfill": study})
    whole = backfill_study(old, upgraded, orig, caption_image, random_orders=2)
    assert (whole["images"], whole["eval_images"]) == (40, 40)
    assert "Measured on" not in render_report({**_report(), "backfill": whole})


def test_backfill_study_starts_at_new_old_and_ends_at_orig_new_new_and_is_drawn():
    from xbtcore.evaluate import backfill_study, evaluate_cases

    old, upgraded, orig, caption_image = _sides(n_images=40, per_image=3)
    study = backfill_study(old, upgraded, orig, caption_image, random_orders=2)
    recall = evaluate_cases(old, upgraded, orig, caption_image)["t2i"]
    assert study["fractions"][0] == 0.0 and study["fractions"][-1] == 1.0
    assert list(study["curves"]) == [study["order"], "random"] and study["order"] == BACKFILL_ORDER
    for curve in study["curves"].values():
        assert len(curve) == len(study["fractions"])
        for k in ("1", "5", "10"):
            assert curve[0][k] == pytest.approx(recall["new/old"][k], abs=0.01)
            assert curve[-1][k] == pytest.approx(recall["orig-new/new"][k], abs=0.01)
    for i, lows_highs in enumerate(study["random_min_max"]):  # the mean lies within its orders' range
        for k, (low, high) in lows_highs.items():
            assert low - 0.01 <= study["curves"]["random"][i][k] <= high + 0.01
    assert any(low < high for r in study["random_min_max"] for low, high in r.values())  # orders differ
    html = render_report({**_report(), "backfill": study})
    assert "If you backfill" in html and html.count("<polyline") == 2
    assert html.count("<polygon") == 1 and "the shaded band" in html
    older = {key: v for key, v in study.items() if key != "random_min_max"}  # a report without the range
    assert "<polygon" not in render_report({**_report(), "backfill": older})
    assert "If you backfill" not in render_report(_report())
