"""report.html of a training run: loss and fidelity curves (inline SVG) and sample grids over steps.

One self-contained file (images embedded as base64 PNG) that answers "did it learn to follow the condition, and
when?": the fidelity curve with the floor (base model without control) and the ceiling (the ground-truth images
scored by the same metric), the threshold and the sudden-convergence step (paper Sec. 4, Fig. 4).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

SVG_WIDTH, SVG_HEIGHT, MARGIN = 640, 240, 40
REPORT_FILE = "report.html"  # written last by a run that ends (train/preflight.py: a finished run has one)
LOSS_SMOOTHING = 0.9  # exponential moving average shown beside the raw loss


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _polyline(points: list[tuple[float, float]], xr, yr, colour: str) -> str:
    if not points:
        return ""
    (x0, x1), (y0, y1) = xr, yr
    sx = (SVG_WIDTH - 2 * MARGIN) / ((x1 - x0) or 1)
    sy = (SVG_HEIGHT - 2 * MARGIN) / ((y1 - y0) or 1)
    coords = " ".join(f"{MARGIN + (x - x0) * sx:.1f},{SVG_HEIGHT - MARGIN - (y - y0) * sy:.1f}" for x, y in points)
    return f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>'


def svg_chart(
    title: str,
    series: dict[str, tuple[list[tuple[float, float]], str]],
    y_range=None,
    hlines: dict[str, tuple[float, str]] | None = None,
    vline: float | None = None,
) -> str:
    """A line chart: series name -> (points, colour); horizontal reference lines; one vertical marker."""
    xs = [x for pts, _ in series.values() for x, _ in pts] or [0, 1]
    ys = [y for pts, _ in series.values() for _, y in pts] + [v for v, _ in (hlines or {}).values()]
    xr = (min(xs), max(xs))
    yr = y_range or (min(ys or [0]), max(ys or [1]))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_WIDTH}" height="{SVG_HEIGHT}">',
        f'<text x="{MARGIN}" y="20" font-size="14">{html.escape(title)}</text>',
        f'<rect x="{MARGIN}" y="{MARGIN}" width="{SVG_WIDTH - 2 * MARGIN}" height="{SVG_HEIGHT - 2 * MARGIN}" '
        'fill="none" stroke="#999"/>',
        f'<text x="{MARGIN}" y="{SVG_HEIGHT - 10}" font-size="11">step {xr[0]:g} .. {xr[1]:g}; '
        f"y {yr[0]:.3g} .. {yr[1]:.3g}</text>",
    ]
    for name, (value, colour) in (hlines or {}).items():
        parts.append(
            _polyline([(xr[0], value), (xr[1], value)], xr, yr, colour).replace("/>", ' stroke-dasharray="4"/>')
        )
        parts.append(
            f'<text x="{SVG_WIDTH - MARGIN + 2}" y="{_y(value, yr)}" font-size="10">{html.escape(name)}</text>'
        )
    if vline is not None:
        parts.append(_polyline([(vline, yr[0]), (vline, yr[1])], xr, yr, "#d62728"))
    legend_x = MARGIN + 150
    for name, (pts, colour) in series.items():
        parts.append(_polyline(pts, xr, yr, colour))
        parts.append(f'<text x="{legend_x}" y="20" font-size="11" fill="{colour}">{html.escape(name)}</text>')
        legend_x += 120
    parts.append("</svg>")
    return "\n".join(parts)


def _y(value: float, yr) -> float:
    return SVG_HEIGHT - MARGIN - (value - yr[0]) * (SVG_HEIGHT - 2 * MARGIN) / ((yr[1] - yr[0]) or 1)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" style="image-rendering: pixelated; max-width: 100%">'


def write_report(run_dir: Path, config, summary) -> Path:
    """Write run_dir/report.html from metrics.jsonl, the sample grids and the run summary."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r and r["loss"] == r["loss"]]
    smooth, ema = [], None
    for step, loss in losses:
        ema = loss if ema is None else LOSS_SMOOTHING * ema + (1 - LOSS_SMOOTHING) * loss
        smooth.append((step, ema))
    fidelity = [(r["step"], r["fidelity"]) for r in records if r.get("event") == "validation"]
    threshold = config.validation.threshold
    body = [
        f"<h1>ControlNet training run: {html.escape(str(run_dir))}</h1>",
        f"<p>status <b>{summary.status}</b> at step {summary.step}; "
        f"final weights: {html.escape(str(summary.final_dir))}</p>",
    ]
    if summary.floor is not None:
        last = fidelity[-1][1] if fidelity else float("nan")
        conv = summary.convergence_step
        body.append(
            f"<p>fidelity ({html.escape(_metric_name(records))}): final <b>{last:.3f}</b>, floor (base without "
            f"control) {summary.floor:.3f}, ceiling (ground truth) {summary.ceiling:.3f}; threshold {threshold}; "
            f"sudden convergence at step <b>{conv if conv is not None else 'not reached'}</b> (paper Sec. 4)</p>"
        )
    body.append(svg_chart("training loss", {"loss": (losses, "#aaaaaa"), "smoothed": (smooth, "#1f77b4")}))
    if fidelity:
        hl = {"threshold": (threshold, "#d62728")}
        if summary.floor is not None:
            hl.update({"floor": (summary.floor, "#7f7f7f"), "ceiling": (summary.ceiling, "#2ca02c")})
        body.append(
            svg_chart(
                "held-out fidelity", {"fidelity": (fidelity, "#ff7f0e")}, (0.0, 1.0), hl, summary.convergence_step
            )
        )
    samples = run_dir / "samples"
    if (samples / "reference.png").is_file():
        body.append("<h2>held-out conditions / ground truth / base model without control</h2>")
        body.append(_img(samples / "reference.png"))
    grids = sorted(samples.glob("step-*.png")) if samples.is_dir() else []
    if grids:
        body.append("<h2>samples over steps</h2>")
        for path in grids:
            step = int(path.stem.split("-")[1])
            score = dict(fidelity).get(step)
            body.append(f"<p>step {step}" + (f", fidelity {score:.3f}" if score is not None else "") + "</p>")
            body.append(_img(path))
    body.append("<h2>config</h2><pre>" + html.escape(json.dumps(config.to_dict(), indent=2)) + "</pre>")
    out = run_dir / REPORT_FILE
    out.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>ControlNet run</title></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    return out


def _metric_name(records: list[dict]) -> str:
    for r in records:
        if "metric" in r:
            return r["metric"]
    return "fidelity"
