"""The run's HTML report for people: one self-contained file (inline CSS and SVG, base64 PNG thumbnails, no JS).

Sections: the verdict (method, models, Eqn. 2 gate and its failures, counts,
timings); recall bars per case and K in both directions; a 2-D map of eval
image and text embeddings in the old and the original new space (Fig. 5 of the
XBT paper); retrieval examples, new-model text queries against the old image
gallery next to the old model's own (Fig. 4).

`xbtcore.inspect_sample.report_sample` picks, from the eval embeddings of each
side, what the map and the examples need (the evaluate task saves it);
`render_report` turns plain data into the HTML string. No prefect, mlflow or
file I/O here: tasks/report.py reads and writes.
"""

from __future__ import annotations

import base64
import html
import io
import math

import torch

from xbtcore.inspect_sample import pca_2d

# One colour per model, one marker per modality: the map's legend and the bars share them.
CASE_COLOURS = {
    "old/old": "#8a8f98",
    "new/old": "#e8590c",
    "new/new": "#f59f00",
    "orig-new/new": "#2f9e44",
    "prev/old": "#7048e8",
}
SERIES = {  # name -> (label, colour, modality)
    "v_old": ("old model, images (v_old)", "#1c7ed6", "image"),
    "w_old": ("old model, texts (w_old)", "#1c7ed6", "text"),
    "v_bar": ("upgraded new model via φ, images (v̄_new)", "#e8590c", "image"),
    "w_bar": ("upgraded new model via φ, texts (w̄_new)", "#e8590c", "text"),
    "v_new": ("original new model, images (v_new)", "#2f9e44", "image"),
    "w_new": ("original new model, texts (w_new)", "#2f9e44", "text"),
}
PANELS = (
    (
        "A. old embedding space",
        "old model and the upgraded new model (φ-mapped): compatible embeddings overlap",
        ("v_old", "w_old", "v_bar", "w_bar"),
    ),
    (
        "B. original new embedding space",
        "the unmodified new model, for reference (what a backfill would use)",
        ("v_new", "w_new"),
    ),
)


def map_panels(sample: dict[str, torch.Tensor]) -> list[dict]:
    """The two panels of the map as plain data: title, note, variance shares, series of (x, y) points."""
    panels = []
    for title, note, names in PANELS:
        xy, share = pca_2d(torch.cat([sample[n] for n in names]))
        parts = xy.split([sample[n].shape[0] for n in names])
        panels.append(
            {
                "title": title,
                "note": note,
                "variance": share,
                "series": [{"name": n, "points": p.tolist()} for n, p in zip(names, parts)],
            }
        )
    return panels


def examples_of(
    sample: dict[str, torch.Tensor], captions: list[str], image_ids: list, load_image, size: int = 96
) -> list[dict]:
    """`report_sample`'s queries as `render_report` examples; load_image(i) -> the PIL image of eval image i."""
    pngs: dict[int, bytes] = {}

    def png(i: int) -> bytes:
        if i not in pngs:
            pngs[i] = thumbnail_png(load_image(i), size)
        return pngs[i]

    examples = []
    for q, (c, own) in enumerate(zip(sample["query_captions"].tolist(), sample["query_images"].tolist())):
        rows = []
        for name, label in (("new", "upgraded new model (w̄_new / v_old)"), ("old", "old model (w_old / v_old)")):
            hits = [
                {"image": image_ids[i], "score": s, "is_gt": i == own, "png": png(i)}
                for i, s in zip(sample[f"top_{name}"][q].tolist(), sample[f"score_{name}"][q].tolist())
            ]
            rows.append({"label": label, "rank": int(sample[f"rank_{name}"][q]), "hits": hits})
        examples.append({"caption": captions[c], "gt_image": image_ids[own], "gt_png": png(own), "rows": rows})
    return examples


def thumbnail_png(image, size: int = 96) -> bytes:
    """A PIL image, shrunk to fit `size` pixels (never enlarged), as PNG bytes."""
    im = image.convert("RGB")
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# --- rendering ---------------------------------------------------------------------------------


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#212529;margin:0;
background:#f8f9fa}
main{max-width:1120px;margin:0 auto;padding:24px}
section{background:#fff;border:1px solid #dee2e6;border-radius:8px;padding:16px 20px;margin:0 0 18px}
h1{font-size:22px;margin:0 0 6px}h2{font-size:17px;margin:0 0 10px}h3{font-size:14px;margin:0 0 4px}
code{font:12px ui-monospace,"DejaVu Sans Mono",monospace;background:#f1f3f5;padding:1px 4px;border-radius:3px;
word-break:break-all}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:600;color:#fff}
.pass{background:#2f9e44}.fail{background:#e03131}
.muted{color:#6c757d}.small{font-size:12px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
td,th{padding:3px 9px;border-bottom:1px solid #e9ecef;text-align:right}th{background:#f8f9fa}
td:first-child,th:first-child{text-align:left}
td.ok{background:#ebfbee}td.bad{background:#fff5f5;color:#c92a2a;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:16px}.grid>div{flex:1 1 480px;min-width:0}
.kv{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px}
ul.failures{margin:6px 0 0;padding-left:20px;color:#c92a2a;font-weight:600}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px;margin:4px 0}
.legend span{display:inline-flex;align-items:center;gap:4px}
.grid>div>svg{max-width:100%;height:auto}
svg text{font-family:system-ui,"DejaVu Sans",sans-serif}
.example{border-top:1px solid #e9ecef;padding:10px 0;display:flex;gap:16px;align-items:flex-start}
.example .query{width:300px;flex:none}
.example:first-of-type{border-top:0}
.query{display:flex;gap:10px;align-items:flex-start}
.caption{font-size:14px}
.row{display:flex;align-items:center;gap:8px;margin:4px 0}
.row .who{width:170px;flex:none;font-size:12px}
.hit{display:flex;flex-direction:column;align-items:center;font-size:11px;color:#6c757d}
img.thumb{width:72px;height:72px;object-fit:contain;image-rendering:pixelated;border:3px solid transparent;
border-radius:4px;background:#fff}
img.gt{border-color:#2f9e44}
.hit.gt{color:#2f9e44;font-weight:600}
"""


def _header(report: dict) -> str:
    gate = report["gate"]
    verdicts = [("Eqn. 2 gate", gate, "old/old")]
    if "no_regression" in report:
        verdicts.append(("no-regression gate", report["no_regression"], "prev/old"))
    passed = all(v["passed"] for _, v, _ in verdicts)
    badge = f'<span class="badge {"pass" if passed else "fail"}">{"gate passed" if passed else "gate failed"}</span>'
    lines = [
        f"<h1>xbt upgrade report {badge}</h1>",
        '<div class="kv">',
        f"<span>method</span><span><b>{_e(report['method'])}</b></span>",
        f"<span>old model (gallery)</span><span><code>{_e(report['old'])}</code></span>",
        f"<span>new model</span><span><code>{_e(report['new'])}</code></span>",
    ]
    if "space" in report:
        lines.append(f"<span>embedding space</span><span><code>{_e(report['space'])}</code></span>")
    promo = report.get("promotion")
    if promo:
        lines.append(
            f"<span>MLflow</span><span><code>{_e(promo.get('model'))}</code> version "
            f"{_e(promo.get('version'))}: {_e(promo.get('reason'))}</span>"
        )
    if report.get("bundle"):
        lines.append(f"<span>bundle</span><span><code>{_e(report['bundle'])}</code></span>")
    lines.append("</div>")
    for name, v, reference in verdicts:
        ks = ", ".join(str(k) for k in v["ks"])
        rule = f"new/old &gt; {reference}" if v["criterion"] == "eqn2" else f"new/old &ge; {reference}"
        state = "passed" if v["passed"] else f"failed ({len(v['failures'])} failing checks)"
        lines.append(
            f"<p><b>{name}</b> ({rule} at K = {ks}, t2i and i2t): "
            f'<span class="{"muted" if v["passed"] else "badge fail"}">{state}</span></p>'
        )
        if v["failures"]:
            lines.append(
                '<ul class="failures">'
                + "".join(
                    f"<li>{_e(d)} R@{_e(k)}: new/old {_e(a)} {'&le;' if v['criterion'] == 'eqn2' else '&lt;'} "
                    f"{reference} {_e(b)}</li>"
                    for d, k, a, b in v["failures"]
                )
                + "</ul>"
            )
    if report.get("next_steps"):
        lines.append(
            "<p><b>next steps</b></p><ul>" + "".join(f"<li>{_e(s)}</li>" for s in report["next_steps"]) + "</ul>"
        )
    counts = "".join(
        f"<tr><td>{_e(k.replace('_', ' '))}</td><td>{int(n):,}</td></tr>" for k, n in report.get("counts", {}).items()
    )
    timings = dict(report.get("timings_s", {}))
    total = float(timings.pop("total", sum(float(s) for s in timings.values())))
    times = "".join(f"<tr><td>{_e(k)}</td><td>{_fmt_s(float(s))}</td></tr>" for k, s in timings.items())
    rest = total - sum(float(s) for s in timings.values())
    if rest > 0.5:  # start-up, the built-in world, registration, reports
        times += f"<tr><td>start-up, world, registry, reports</td><td>{_fmt_s(rest)}</td></tr>"
    times += f"<tr><th>total</th><th>{_fmt_s(total)}</th></tr>"
    lines.append(
        '<div class="grid" style="margin-top:8px">'
        f"<div><h3>counts</h3><table>{counts}</table></div>"
        f"<div><h3>timings</h3><table>{times}</table></div></div>"
    )
    return "<section>" + "\n".join(lines) + "</section>"


def _candidates_section(report: dict) -> str:
    """The methods `--method auto` ran, each one's margins on the validation pairs, and which it kept, why."""
    candidates, chosen = report.get("candidates") or [], report.get("chosen") or {}
    if len(candidates) < 2:
        return ""
    head = "".join(f"<th>{d} R@{k}</th>" for d in ("t2i", "i2t") for k in (1, 5, 10))
    rows = []
    for c in candidates:
        name = f"<b>{_e(c['method'])}</b> (kept)" if c["method"] == chosen.get("method") else _e(c["method"])
        if not c["ran"]:
            rows.append(
                f'<tr><td>{name}</td><td>{c["cost"]}</td><td colspan="8" class="muted">not run: '
                f"{_e(c['why'])}</td></tr>"
            )
            continue
        cells = ""
        for d in ("t2i", "i2t"):
            for k in ("1", "5", "10"):
                m = c["margins"][d][k]
                ok = m["margin"] > 0 and m["low"] > 0
                cells += (
                    f'<td class="{"ok" if ok else "bad"}">{m["margin"]:+.2f}<br><span class="muted small">'
                    f"{m['low']:+.2f}..{m['high']:+.2f}</span></td>"
                )
        note = (
            "" if c["eligible"] else '<br><span class="muted small">queries run the old encoder: not eligible</span>'
        )
        rows.append(f"<tr><td>{name}{note}</td><td>{c['cost']}</td><td>{_fmt_s(float(c['seconds']))}</td>{cells}</tr>")
    return (
        "<section><h2>Candidates, on the validation pairs</h2>"
        f"<p>{_e(chosen.get('reason', ''))}. Each cell: new/old &minus; old/old in points, its 95% interval "
        "below; cost classes from <code>xbt methods</code>.</p>"
        f"<table><tr><th>method</th><th>cost</th><th>time</th>{head}</tr>{''.join(rows)}</table></section>"
    )


def _bar_label(v) -> str:
    return "100" if float(v) >= 99.95 else f"{float(v):.1f}"


def _bars_svg(direction: str, cases: dict) -> str:
    """Grouped bars: one group per K, one bar per case; old/old's value drawn across its group."""
    ks = list(next(iter(cases.values())))
    names = list(cases)
    w, h, left, top, bottom = 520, 250, 40, 24, 36
    plot_w, plot_h = w - left - 10, h - top - bottom
    group = plot_w / len(ks)
    bar = min(26.0, (group - 16) / len(names))

    def y(v) -> float:
        return top + plot_h * (1 - float(v) / 100)

    out = [
        f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{_e(direction)} recall">',
        f'<text x="{left}" y="14" font-size="13" font-weight="600">{_e(direction)}: recall@K (%)</text>',
    ]
    for v in range(0, 101, 25):
        out.append(
            f'<line x1="{left}" x2="{w - 10}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e9ecef"/>'
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" font-size="11" text-anchor="end" fill="#6c757d">{v}</text>'
        )
    for gi, k in enumerate(ks):
        x0 = left + gi * group + (group - bar * len(names)) / 2
        for ci, case in enumerate(names):
            v = cases[case][k]
            x = x0 + ci * bar
            colour = CASE_COLOURS.get(case, "#495057")
            out.append(
                f'<rect x="{x:.1f}" y="{y(v):.1f}" width="{bar - 2:.1f}" height="{y(0) - y(v):.1f}" '
                f'fill="{colour}"><title>{_e(case)} R@{_e(k)}: {float(v):.2f}</title></rect>'
            )
            out.append(
                f'<text x="{x + (bar - 2) / 2:.1f}" y="{y(v) - 3:.1f}" font-size="8.5" text-anchor="middle" '
                f'fill="#495057">{_bar_label(v)}</text>'
            )
        if "old/old" in cases:  # the reference the gate compares against
            ry = y(cases["old/old"][k])
            out.append(
                f'<line x1="{x0 - 3:.1f}" x2="{x0 + bar * len(names) + 1:.1f}" y1="{ry:.1f}" y2="{ry:.1f}" '
                f'stroke="#343a40" stroke-dasharray="3 2" stroke-width="1"/>'
            )
        out.append(
            f'<text x="{left + gi * group + group / 2:.1f}" y="{h - bottom + 16}" font-size="12" '
            f'text-anchor="middle">K = {_e(k)}</text>'
        )
    out.append(f'<line x1="{left}" x2="{w - 10}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#adb5bd"/></svg>')
    return "".join(out)


def _recall_table(direction: str, cases: dict, gate: dict, margins: dict | None = None) -> str:
    """The numbers under a chart; the gate's new/old cells green (pass) or red (fail)."""
    gate_ks = {str(k) for k in gate["ks"]}
    failed = {str(k) for d, k, *_ in gate["failures"] if d == direction}
    ks = list(next(iter(cases.values())))
    rows = [f"<tr><th>{_e(direction)}</th>" + "".join(f"<th>R@{_e(k)}</th>" for k in ks) + "</tr>"]
    for case, rs in cases.items():
        cells = []
        for k in ks:
            cls = ""
            if case == "new/old" and k in gate_ks:
                cls = ' class="bad"' if k in failed else ' class="ok"'
            cells.append(f"<td{cls}>{float(rs[k]):.2f}</td>")
        swatch = f'<span style="color:{CASE_COLOURS.get(case, "#495057")}">&#9632;</span> '
        rows.append(f"<tr><td>{swatch}{_e(case)}</td>{''.join(cells)}</tr>")
    if "new/old" in cases and "old/old" in cases:
        delta = "".join(
            f'<td class="muted">{float(cases["new/old"][k]) - float(cases["old/old"][k]):+.2f}</td>' for k in ks
        )
        rows.append(f'<tr><td class="muted">&Delta; new/old &minus; old/old</td>{delta}</tr>')
    if margins and direction in margins:
        ci = "".join(
            f'<td class="muted">{m["low"]:+.2f}..{m["high"]:+.2f}</td>'
            if (m := margins[direction].get(k))
            else "<td></td>"
            for k in ks
        )
        rows.append(
            f'<tr><td class="muted" title="paired bootstrap over the eval images, '
            f'{margins["n_boot"]} resamples">{round(100 * margins["level"])}% interval of &Delta;</td>{ci}</tr>'
        )
    return f"<table>{''.join(rows)}</table>"


def _recall_section(report: dict) -> str:
    recall = report["recall"]
    legend = "".join(
        f'<span><svg width="12" height="12"><rect width="12" height="12" '
        f'fill="{CASE_COLOURS.get(c, "#495057")}"/></svg>{_e(c)}</span>'
        for c in next(iter(recall.values()))
    )
    legend += (
        '<span><svg width="18" height="12"><line x1="0" x2="18" y1="6" y2="6" stroke="#343a40" '
        'stroke-dasharray="3 2"/></svg>old/old (the system today)</span>'
    )
    charts = "".join(
        f"<div>{_bars_svg(d, cases)}{_recall_table(d, cases, report['gate'], report.get('gate_margins'))}</div>"
        for d, cases in recall.items()
    )
    return (
        "<section><h2>Recall per case and K</h2>"
        '<p class="muted small">Cases are query/gallery (CONTRACT.md): <b>new/old</b> is the upgraded new '
        "model's queries against the old gallery, the case the Eqn. 2 gate compares with <b>old/old</b>. "
        "t2i: every caption queries the images; i2t: every image queries the captions. "
        "In the tables, green / red: a gate check of new/old that passes / fails.</p>"
        f'<div class="legend">{legend}</div><div class="grid">{charts}</div></section>'
    )


def _marker(modality: str, x: float, y: float, colour: str, r: float = 3.2) -> str:
    if modality == "image":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{colour}" fill-opacity="0.55"/>'
    d = r * 1.25  # texts: hollow triangles, so both modalities stay visible where they overlap
    return (
        f'<path d="M{x:.1f} {y - d:.1f}L{x + d:.1f} {y + d * 0.8:.1f}L{x - d:.1f} {y + d * 0.8:.1f}Z" '
        f'fill="none" stroke="{colour}" stroke-width="1.1" stroke-opacity="0.8"/>'
    )


def _scatter_svg(panel: dict, size: int = 440) -> str:
    pts = [p for s in panel["series"] for p in s["points"]]
    pad = 14
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    lo_x, hi_x, lo_y, hi_y = min(xs), max(xs), min(ys), max(ys)
    span = max(hi_x - lo_x, hi_y - lo_y, 1e-9)  # equal scale on both axes: distances are honest
    cx, cy = (lo_x + hi_x) / 2, (lo_y + hi_y) / 2
    scale = (size - 2 * pad) / span
    out = [
        (
            f'<svg viewBox="0 0 {size} {size}" width="{size}" height="{size}" role="img" '
            f'aria-label="{_e(panel["title"])}"><rect width="{size}" height="{size}" fill="#fff" stroke="#dee2e6"/>'
        )
    ]
    for s in panel["series"]:
        _, colour, modality = SERIES[s["name"]]
        out.extend(
            _marker(modality, size / 2 + (x - cx) * scale, size / 2 - (y - cy) * scale, colour) for x, y in s["points"]
        )
    var = panel.get("variance", [])
    if len(var) == 2:
        out.append(
            f'<text x="{size - 6}" y="{size - 6}" font-size="11" text-anchor="end" fill="#6c757d">'
            f"PC1 {100 * var[0]:.0f}%, PC2 {100 * var[1]:.0f}% of variance</text>"
        )
    out.append("</svg>")
    return "".join(out)


def _legend_for(names) -> str:
    items = []
    for n in names:
        label, colour, modality = SERIES[n]
        items.append(
            f'<span><svg width="14" height="14">{_marker(modality, 7, 7.5, colour, 4)}</svg>{_e(label)}</span>'
        )
    return f'<div class="legend">{"".join(items)}</div>'


def _map_section(panels: list[dict] | None, n_points: int | None) -> str:
    head = "<section><h2>Embedding map (PCA to 2-D)</h2>"
    if not panels:
        return (
            head
            + '<p class="muted">No eval embeddings were saved with this run: the map is not available.</p></section>'
        )
    body = "".join(
        f'<div><h3>{_e(p["title"])}</h3><p class="muted small" style="margin:0">{_e(p["note"])}</p>'
        f"{_scatter_svg(p)}{_legend_for(s['name'] for s in p['series'])}</div>"
        for p in panels
    )
    return (
        head + f'<p class="muted small">{n_points} random eval images and one caption of each, every point of a '
        "panel projected by the same PCA (Fig. 5 of the XBT paper). Circles are images, triangles texts.</p>"
        f'<div class="grid">{body}</div></section>'
    )


def _img(png: bytes, cls: str, title: str) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return f'<img class="{cls}" src="data:image/png;base64,{b64}" alt="{_e(title)}" title="{_e(title)}">'


def _examples_section(examples: list[dict] | None) -> str:
    head = "<section><h2>Retrieval examples: text queries against the old image gallery</h2>"
    if not examples:
        return head + '<p class="muted">No eval embeddings were saved with this run: no examples.</p></section>'
    out = [
        head,
        (
            '<p class="muted small">Random eval captions as queries, top 5 of the old gallery (v_old, never '
            "re-embedded). The upgraded new model's query (w̄_new / v_old, the new/old case) against the old "
            "model's own (w_old / v_old). A green frame marks the caption's own image (Fig. 4 of the XBT "
            "paper).</p>"
        ),
    ]
    for ex in examples:
        out.append(
            f'<div class="example"><div class="query">{_img(ex["gt_png"], "thumb gt", "the caption’s own image")}'
            f'<div><div class="caption">&ldquo;{_e(ex["caption"])}&rdquo;</div>'
            f'<div class="muted small">own image: {_e(ex["gt_image"])}</div></div></div><div>'
        )
        for row in ex["rows"]:
            rank = row["rank"]
            found = (
                f"own image at rank {rank}" if rank <= len(row["hits"]) else f"own image at rank {rank} (not shown)"
            )
            hits = "".join(
                f'<div class="hit{" gt" if h["is_gt"] else ""}">'
                f"{_img(h['png'], 'thumb gt' if h['is_gt'] else 'thumb', h['image'])}"
                f"{i + 1}. {float(h['score']):.3f}</div>"
                for i, h in enumerate(row["hits"])
            )
            out.append(
                f'<div class="row"><div class="who"><b>{_e(row["label"])}</b><br>'
                f'<span class="muted">{_e(found)}</span></div>{hits}</div>'
            )
        out.append("</div></div>")
    out.append("</section>")
    return "".join(out)


ORDER_COLOURS = ("#1c7ed6", "#f08c00", "#868e96", "#ae3ec9", "#2f9e44")  # the product's order first


def backfill_svg(study: dict, k: str = "1", refs: dict | None = None) -> str:
    """A line per backfill order: t2i R@k of the mixed gallery against the share of the gallery re-embedded.
    study: report.json's `backfill` (fractions; curves: order -> one recall dict per fraction, the
    product's order first; random_min_max, where present: the random orders' lowest and highest, drawn as a
    band). refs: label -> value drawn as a dashed line across (old/old, the system today)."""
    fractions = [float(f) for f in study["fractions"]]
    curves = study["curves"]
    band = [(float(r[k][0]), float(r[k][1])) for r in study.get("random_min_max") or []]
    colour = dict(zip(curves, ORDER_COLOURS))
    values = [float(c[i][k]) for c in curves.values() for i in range(len(fractions))]
    values += [v for pair in band for v in pair]
    values += [float(v) for v in (refs or {}).values()]
    lo, hi = 5 * math.floor(min(values) / 5), 5 * math.ceil(max(values) / 5 + 1e-9)
    hi = max(hi, lo + 5)
    w, h, left, top, bottom, right = 520, 260, 44, 26, 40, 12
    plot_w, plot_h = w - left - right, h - top - bottom

    def x(f: float) -> float:
        return left + plot_w * f

    def y(v: float) -> float:
        return top + plot_h * (1 - (v - lo) / (hi - lo))

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
        'aria-label="backfill recall">',
        f'<text x="{left}" y="15" font-size="13" font-weight="600">t2i R@{_e(k)} (%) of the mixed gallery</text>',
    ]
    step = 5 if hi - lo <= 40 else 10
    for v in range(lo, hi + 1, step):
        out.append(
            f'<line x1="{left}" x2="{w - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e9ecef"/>'
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" font-size="11" text-anchor="end" fill="#6c757d">{v}</text>'
        )
    for f in fractions:
        out.append(
            f'<text x="{x(f):.1f}" y="{h - bottom + 16}" font-size="11" text-anchor="middle" '
            f'fill="#6c757d">{round(100 * f)}%</text>'
        )
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{h - 6}" font-size="12" text-anchor="middle">'
        "share of the gallery re-embedded by the new model</text>"
    )
    for label, v in (refs or {}).items():
        out.append(
            f'<line x1="{left}" x2="{w - right}" y1="{y(float(v)):.1f}" y2="{y(float(v)):.1f}" stroke="#343a40" '
            f'stroke-dasharray="3 2"><title>{_e(label)}: {float(v):.2f}</title></line>'
        )
    if band and "random" in colour:
        edge = [(x(f), y(hi_)) for f, (_, hi_) in zip(fractions, band)]
        edge += [(x(f), y(lo_)) for f, (lo_, _) in reversed(list(zip(fractions, band)))]
        out.append(
            f'<polygon fill="{colour["random"]}" fill-opacity="0.15" stroke="none" '
            f'points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in edge)}"><title>random orders: lowest to highest'
            "</title></polygon>"
        )
    for o, curve in curves.items():
        pts = [(x(f), y(float(curve[i][k]))) for i, f in enumerate(fractions)]
        out.append(
            f'<polyline fill="none" stroke="{colour[o]}" stroke-width="2" '
            f'points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in pts)}"/>'
        )
        for (a, b), f, i in zip(pts, fractions, range(len(fractions))):
            out.append(
                f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{colour[o]}"><title>{_e(o)} at {round(100 * f)}%: '
                f"{float(curve[i][k]):.2f}</title></circle>"
            )
    for i, (label, line, dash) in enumerate(
        [(f"{o} order", colour[o], "") for o in curves] + [(r, "#343a40", "3 2") for r in refs or {}]
    ):
        ly = top + 8 + 14 * i
        out.append(
            f'<line x1="{left + 10}" x2="{left + 28}" y1="{ly}" y2="{ly}" stroke="{line}" stroke-width="2" '
            f'stroke-dasharray="{dash}"/><text x="{left + 33}" y="{ly + 4}" font-size="11">{_e(label)}</text>'
        )
    out.append(f'<line x1="{left}" x2="{w - right}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#adb5bd"/></svg>')
    return "".join(out)


def _backfill_section(report: dict) -> str:
    study = report.get("backfill")
    if not study:
        return ""
    refs = {"old/old (the system today)": report["recall"]["t2i"]["old/old"]["1"]}
    curves = study["curves"]
    ks = list(next(iter(curves.values()))[0])
    head = "".join(f"<th>{_e(o)}<br>R@{' / '.join(map(_e, ks))}</th>" for o in curves)
    rows = [f"<tr><th>re-embedded</th>{head}</tr>"]
    for i, f in enumerate(study["fractions"]):
        cells = "".join(f"<td>{' / '.join(f'{float(c[i][k]):.2f}' for k in ks)}</td>" for c in curves.values())
        rows.append(f"<tr><td>{round(100 * float(f))}%</td>{cells}</tr>")
    return (
        "<section><h2>If you backfill: recall on the way</h2>"
        '<p class="muted small">Text queries on this eval set while <code>xbt backfill</code> re-embeds the '
        "gallery with the new model, searched as <code>xbt serve</code> searches the mixed gallery: at 0% the "
        "upgraded queries against the old gallery (new/old), at 100% the new model alone (orig-new/new). "
        f"{_e(study['order'])} is the order <code>xbt backfill</code> uses with this bundle"
        + (
            ": each item's gain predicted by a model fitted on the validation pairs, plus its isolation "
            "(isolated-first's key). "
            if study["order"] == "learned"
            else ". "
        )
        + (
            f"Measured on {study['images']:,} of the {study['eval_images']:,} eval images (a seeded sample with "
            "all their captions; a smaller gallery, so every figure is above the full set's). "
            if study.get("images", 0) < study.get("eval_images", 0)
            else ""
        )
        + f"Random order: the mean of {study['random_orders']} permutations"
        + ("; the shaded band, the lowest and highest of them" if study.get("random_min_max") else "")
        + ".</p>"
        f'<div class="grid"><div>{backfill_svg(study, "1", refs)}</div>'
        f"<div><table>{''.join(rows)}</table></div></div></section>"
    )


def render_report(
    report: dict, panels: list[dict] | None = None, examples: list[dict] | None = None, n_map_points: int | None = None
) -> str:
    """The whole report as one HTML string.

    report: report.json's dict (method, old, new, recall, gate, counts, timings_s; optional
    no_regression, promotion, space, bundle, next_steps). panels: `map_panels`' output. examples: one dict per
    query: caption, gt_image (its id), gt_png, rows = [{label, rank, hits = [{image, score, is_gt, png}]}].
    Every string from the data is escaped.
    """
    title = f"xbt upgrade: {report['method']} {report['old']} -> {report['new']}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>",
            _header(report),
            _candidates_section(report),
            _recall_section(report),
            _backfill_section(report),
            _map_section(panels, n_map_points),
            _examples_section(examples),
            '<p class="muted small">Written by xbt: the same numbers are in report.json next to this file.</p>',
            "</main></body></html>",
        ]
    )
