"""The quickstart's report: headline figures (``summarise``) and ``report.json`` / ``report.html`` with
sample grids and quality charts (``write_report``)."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _setting(run: dict[str, Any], steps: int) -> dict[str, Any]:
    return next(s for s in run["settings"] if s["steps"] == steps)


def summarise(results: dict[str, Any], plan: Mapping[str, Any]) -> dict[str, Any]:
    """The headline figures under stable key names, from the evaluation ``results`` and the run's
    ``plan`` (``report["plan"]``: ``teacher_steps_full``, ``lcm_steps``)."""
    runs = results["runs"]
    t50 = _setting(runs["teacher_ddim"], plan["teacher_steps_full"])
    t4 = _setting(runs["teacher_ddim"], 4)
    figures: dict[str, Any] = {}

    def put(name: str, s: dict[str, Any]) -> None:
        figures[name] = {
            "steps": s["steps"],
            "seconds_per_image": s["seconds_per_image"],
            "unet_evals_per_image": s["unet_evals_per_image"],
            "adherence": s["adherence"]["all"] if s.get("adherence") else None,
            "adherence_per_attribute": s.get("adherence"),
            "fd": s.get("fd"),
            "kid": s.get("kid"),
        }

    put("teacher_50", t50)
    put("teacher_4", t4)
    for steps in plan["lcm_steps"]:
        put(f"lcm_{steps}", _setting(runs["lcm"], steps))
    for name, d in results["distance_to_teacher_50"].items():
        figures[name]["rms_to_teacher_50"], figures[name]["fd_to_teacher_50"] = d["rms"], d["fd"]
    lcm4 = figures.get("lcm_4")
    if lcm4 and figures["teacher_50"]["adherence"] is not None:
        figures["lcm4_over_teacher50_adherence"] = lcm4["adherence"] / max(figures["teacher_50"]["adherence"], 1e-9)
    if lcm4:
        figures["lcm4_speedup_over_teacher50"] = figures["teacher_50"]["seconds_per_image"] / lcm4["seconds_per_image"]
    return figures


def write_report(out: Path, report: dict[str, Any], results: dict[str, Any], eval_dir: Path) -> None:
    """``report.json`` (``report`` as it is) and ``report.html`` with its ``grids.png`` (the first prompts'
    images per setting, read from ``eval_dir``'s ``teacher_ddim/steps-N`` and ``lcm/steps-N`` folders) and
    ``quality.png`` (quality against steps and time) in ``out``.

    ``report`` holds ``quick``, ``method``, ``plan``, ``exports``, ``text_separation``, ``feature_net``,
    ``stage_seconds``, ``seconds_total`` and ``figures`` (``summarise``); ``results`` the prompts.
    """
    from PIL import Image, ImageDraw

    from ldmkit.eval.plot import line_chart

    (out / "report.json").write_text(json.dumps(report, indent=1))
    plan = report["plan"]
    ev = Path(eval_dir)
    rows = [
        ("teacher 50 steps (DDIM, guided)", ev / "teacher_ddim" / f"steps-{plan['teacher_steps_full']}"),
        ("teacher 4 steps (DDIM, guided)", ev / "teacher_ddim" / "steps-4"),
    ]
    rows += [(f"LCM {s} step{'s' if s > 1 else ''}", ev / "lcm" / f"steps-{s}") for s in plan["lcm_steps"]]
    cols = min(8, len(results["prompts"]))
    first = Image.open(rows[0][1] / "00000.png")
    w, h = first.size
    scale = max(1, 96 // w)
    label_w = 230
    grid = Image.new("RGB", (label_w + cols * w * scale, len(rows) * h * scale + 40), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, folder) in enumerate(rows):
        y = 40 + r * h * scale
        draw.text((6, y + h * scale // 2 - 6), label, fill="black")
        for c in range(cols):
            im = Image.open(folder / f"{c:05d}.png").convert("RGB").resize((w * scale, h * scale), Image.NEAREST)
            grid.paste(im, (label_w + c * w * scale, y))
    for c in range(cols):
        words, lines = results["prompts"][c].split(), [""]
        for word in words:  # wrap the prompt over the column
            if len(lines[-1]) + len(word) > 14 and lines[-1]:
                lines.append("")
            lines[-1] = f"{lines[-1]} {word}".strip()
        for k, line in enumerate(lines[:3]):
            draw.text((label_w + c * w * scale + 2, 2 + 12 * k), line, fill="black")
    grid.save(out / "grids.png")

    figs = report["figures"]
    names = ["teacher_50", "teacher_4"] + [f"lcm_{s}" for s in plan["lcm_steps"]]
    quality_key = "adherence" if figs["teacher_50"]["adherence"] is not None else "fd"
    teacher_pts = [(figs[n]["steps"], figs[n][quality_key]) for n in ("teacher_4", "teacher_50")]
    lcm_pts = [(figs[f"lcm_{s}"]["steps"], figs[f"lcm_{s}"][quality_key]) for s in plan["lcm_steps"]]
    y_range = (0.0, 1.0) if quality_key == "adherence" else None
    chart_steps = line_chart(
        {"teacher (DDIM)": teacher_pts, "LCM": lcm_pts}, f"{quality_key} vs steps", y_range=y_range
    )
    teacher_t = [
        (round(figs[n]["seconds_per_image"] * 1000), figs[n][quality_key]) for n in ("teacher_4", "teacher_50")
    ]
    lcm_t = [
        (round(figs[f"lcm_{s}"]["seconds_per_image"] * 1000), figs[f"lcm_{s}"][quality_key]) for s in plan["lcm_steps"]
    ]
    chart_time = line_chart(
        {"teacher (DDIM)": teacher_t, "LCM": lcm_t}, f"{quality_key} vs milliseconds per image", y_range=y_range
    )
    plot = Image.new("RGB", (chart_steps.width + chart_time.width, max(chart_steps.height, chart_time.height)), "white")
    plot.paste(chart_steps, (0, 0))
    plot.paste(chart_time, (chart_steps.width, 0))
    plot.save(out / "quality.png")

    def cell(v: Any, fmt: str = "{:.3f}") -> str:
        return "" if v is None else fmt.format(v)

    table = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{figs[n]['steps']}</td><td>{cell(figs[n]['adherence'])}</td>"
        + "".join(
            f"<td>{cell((figs[n]['adherence_per_attribute'] or {}).get(a))}</td>"
            for a in ("color", "shape", "size", "position")
        )
        + f"<td>{cell(figs[n].get('rms_to_teacher_50'))}</td><td>{cell(figs[n].get('fd_to_teacher_50'), '{:.3f}')}</td>"
        f"<td>{cell(figs[n]['fd'], '{:.2f}')}</td><td>{cell(figs[n]['kid'], '{:.4f}')}</td>"
        f"<td>{cell(figs[n]['seconds_per_image'] * 1000, '{:.1f}')}</td><td>{cell(figs[n]['unet_evals_per_image'], '{:.0f}')}</td></tr>"
        for n in names
    )
    stages = "".join(
        f"<li>{html.escape(k)}: <code>{html.escape(str(v))}</code></li>" for k, v in report["exports"].items()
    )
    text = report.get("text_separation", {})
    adherence_html = _caption_adherence_html(report.get("caption_adherence"))
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>ldmkit quickstart</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}}td:first-child{{text-align:left}}</style></head><body>
<h1>ldmkit quickstart report</h1>
<p>{"Quick run" if report["quick"] else "Full run"}, {report["method"]} distillation, {len(results["prompts"])} held-out prompts, same seeds for every setting.
Total time {report["seconds_total"] / 60:.1f} min.</p>
{adherence_html}
<h2>Samples</h2><p>Same prompts and initial noise in every column.</p><img src="grids.png">
<h2>Quality against steps and time</h2><img src="quality.png">
<h2>Figures</h2><table><tr><th>setting</th><th>steps</th><th>adherence</th><th>colour</th><th>shape</th><th>size</th><th>position</th><th>RMS to teacher 50</th><th>FD to teacher 50</th><th>FD to data</th><th>KID to data</th><th>ms / image</th><th>UNet evals / image</th></tr>{table}</table>
<p>Adherence: share of images whose colour, shape, size and position all match the prompt (ldmkit.eval.scorer).
RMS to teacher 50: root-mean-square pixel difference to the teacher's 50-step image from the same noise
(per image; a multistep LCM re-noises between steps, so it leaves the teacher's path: read the 1-step row).
FD to teacher 50: Fréchet distance of the whole image set to the teacher's 50-step set (distribution level).
FD / KID to data: to {report["plan"]["reference_images"]} training images. Features: {html.escape(str(report.get("feature_net")))}
(a fixed random conv net, comparable only within ldmkit).
LCM 4 steps reaches {cell(figs.get("lcm4_over_teacher50_adherence"), "{:.0%}")} of the teacher's 50-step adherence and is
{cell(figs.get("lcm4_speedup_over_teacher50"), "{:.1f}")}x faster per image.</p>
<h2>Text conditioning</h2><pre>{html.escape(json.dumps(text, indent=1))}</pre>
<h2>Stages</h2><ul>{stages}</ul><pre>{html.escape(json.dumps(report["stage_seconds"], indent=1))}</pre>
</body></html>"""
    (out / "report.html").write_text(doc)


def _caption_adherence_html(adh: dict[str, Any] | None) -> str:
    """The "do samples follow their captions?" block: warnings first (visible at the top of the report),
    then caption sensitivity and label accuracy per model (ldmkit.eval.adherence)."""
    if not adh:
        return ""
    warnings = "".join(
        f'<p style="background:#fdd;padding:8px;border-left:4px solid #c00"><b>Warning ({html.escape(name)}):</b> '
        f"{html.escape(entry['warning'])}</p>"
        for name, entry in adh["models"].items()
        if entry.get("warning")
    )
    labelled = adh.get("labels") is not None
    head = "<tr><th>model</th><th>caption sensitivity</th><th>caption distance</th><th>seed distance</th>"
    head += "<th>label accuracy</th></tr>" if labelled else "</tr>"
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{e['sensitivity']:.2f}</td><td>{e['caption_distance']:.3f}</td>"
        f"<td>{e['seed_distance']:.3f}</td>" + (f"<td>{e['label_accuracy']:.2f}</td>" if labelled else "") + "</tr>"
        for name, e in adh["models"].items()
    )
    note = (
        "Caption sensitivity: at a fixed seed, how much the image changes when only the caption changes, "
        f"relative to how much it changes with the seed at a fixed caption ({len(adh['prompts'])} prompts x "
        f"{adh['seeds']} seeds); near 0 means the captions are ignored."
    )
    if labelled:
        held = (
            "held out from every training stage"
            if adh.get("classifier_held_out_from_teacher")
            else "a split of the training data"
        )
        note += (
            f" Label accuracy: a small classifier trained on {held} finds the prompt's label in this share of "
            f"the samples; on real images it scores {adh['classifier_real_accuracy']:.2f} (chance "
            f"{adh['chance']:.2f}, {len(adh['labels'])} labels)."
        )
    return f"<h2>Do samples follow their captions?</h2>{warnings}<table>{head}{rows}</table><p>{note}</p>"
