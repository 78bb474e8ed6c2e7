"""Quality-vs-steps charts drawn with Pillow alone (matplotlib is not a dependency of ldmkit)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75))

# (title, value of one setting or None, fixed y range or None). Panels whose values are all None are left out.
PANELS: tuple[tuple[str, Callable[[dict[str, Any]], float | None], tuple[float, float] | None], ...] = (
    ("shapes adherence (all 4 attributes)", lambda s: (s.get("adherence") or {}).get("all"), (0.0, 1.0)),
    ("FD, ldmkit's random conv features (lower is better)", lambda s: s.get("fd"), None),
    ("KID, ldmkit's random conv features (lower is better)", lambda s: s.get("kid"), None),
    ("FID, Inception-v3 (lower is better)", lambda s: s.get("fid"), None),
    ("CLIP score", lambda s: s.get("clip_score"), None),
    ("seconds per image", lambda s: s.get("seconds_per_image"), None),
)


def line_chart(
    series: dict[str, Sequence[tuple[float, float]]],
    title: str,
    size: tuple[int, int] = (440, 300),
    y_range: tuple[float, float] | None = None,
    x_label: str = "steps",
    log_x: bool = True,
) -> Image.Image:
    """One panel: a line per series of (x, value) points; x on a log2 axis with ticks at the values used
    (``log_x``), or linear with five ticks (e.g. training steps of a loss curve); ``x_label`` under the axis.

    ``y_range`` fixes the y axis (e.g. 0..1 for accuracies); otherwise it spans the data.
    """
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 58, 12, 26, 40
    draw.text((left, 6), title, fill="black", font=font)
    pts = [p for s in series.values() for p in s]
    if not pts:
        return img
    xs = sorted({p[0] for p in pts})
    fx = math.log2 if log_x else float
    lx = [fx(x) for x in xs]
    x_lo, x_hi = lx[0], lx[-1] if lx[-1] > lx[0] else lx[0] + 1
    y_lo, y_hi = y_range or (min(p[1] for p in pts), max(p[1] for p in pts))
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    if y_range is None:
        pad = 0.05 * (y_hi - y_lo)
        y_lo, y_hi = y_lo - pad, y_hi + pad
    decimals = max(0, math.ceil(-math.log10((y_hi - y_lo) / 4)) + 1)

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = left + (fx(x) - x_lo) / (x_hi - x_lo) * (w - left - right)
        py = h - bottom - (y - y_lo) / (y_hi - y_lo) * (h - top - bottom)
        return px, py

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    ticks = xs if log_x else sorted({round(xs[0] + (xs[-1] - xs[0]) * i / 4) for i in range(5)})
    last_end = -1e9
    for x in ticks:
        px, _ = to_px(x, y_lo)
        draw.line([px, h - bottom, px, h - bottom + 4], fill="black")
        label = f"{x:.3g}"  # 3 significant digits: milliseconds such as 4.2507 read 4.25
        start = min(px - 3 * len(label), w - 6 * len(label))
        if start > last_end + 4:  # a label that would overlap the previous one is left out (its tick stays)
            draw.text((start, h - bottom + 6), label, fill="black", font=font)
            last_end = start + 6 * len(label)
    for i in range(5):
        y = y_lo + (y_hi - y_lo) * i / 4
        _, py = to_px(xs[0], y)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((4, py - 6), f"{y:.{decimals}f}", fill="black", font=font)
    draw.text(((left + w - right) // 2 - 3 * len(x_label), h - 16), x_label, fill="black", font=font)
    for k, (label, pts_s) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        line = [to_px(x, y) for x, y in sorted(pts_s)]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        for px, py in line if len(line) <= 40 else []:  # markers for measured settings, not for loss curves
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        draw.text((w - right - 150, top + 4 + 12 * k), label, fill=color, font=font)
    return img


def quality_vs_steps(runs: dict[str, Sequence[dict[str, Any]]], x: str = "steps") -> Image.Image:
    """All available panels for one or more runs (label -> ``evaluate_pipeline(...)["settings"]``), two per row.

    ``x`` is the settings' key on the horizontal axis: ``steps``, or ``unet_evals_per_image`` for
    equal-compute comparisons (a guided teacher step costs 2 evaluations, a distilled step 1)."""
    panels = []
    for title, get, y_range in PANELS:
        series = {label: [(s[x], get(s)) for s in settings if get(s) is not None] for label, settings in runs.items()}
        series = {k: v for k, v in series.items() if v}
        if series:
            panels.append(line_chart(series, title, y_range=y_range, x_label=x.replace("_", " ")))
    if not panels:
        panels.append(line_chart({}, "no metrics"))
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    pw, ph = panels[0].size
    sheet = Image.new("RGB", (cols * pw, rows * ph), "white")
    for i, p in enumerate(panels):
        sheet.paste(p, ((i % cols) * pw, (i // cols) * ph))
    return sheet
