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
    quality_charts(figs, plan["lcm_steps"]).save(out / "quality.png")
    losses = loss_curves(report["exports"])
    if losses is not None:
        losses.save(out / "losses.png")

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
    stage_rows = "".join(
        f'<tr class="stage"><td>{html.escape(k)}</td><td>{_duration(v)}</td></tr>'
        for k, v in report["stage_seconds"].items()
    )
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>ldmkit quickstart</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}}td:first-child{{text-align:left}}</style></head><body>
<h1>ldmkit quickstart report</h1>
<p>{"Quick run" if report["quick"] else "Full run"}, {report["method"]} distillation, {len(results["prompts"])} held-out prompts, same seeds for every setting.
Total time {report["seconds_total"] / 60:.1f} min.</p>
{adherence_html}
{QUICK_NOTICE if report["quick"] else ""}
{what_next(report)}
<h2>Samples</h2><p>Same prompts and initial noise in every column.</p><img src="grids.png">
<h2>Quality against steps and time</h2><p>Each attribute's adherence and the FD to the data, against sampling
steps (left) and milliseconds per image (right).</p><img src="quality.png">
{'<h2>Training loss of each stage</h2><img src="losses.png">' if losses is not None else ""}
<h2>Figures</h2><table><tr><th>setting</th><th>steps</th><th>adherence</th><th>colour</th><th>shape</th><th>size</th><th>position</th><th>RMS to teacher 50</th><th>FD to teacher 50</th><th>FD to data</th><th>KID to data</th><th>ms / image</th><th>UNet evals / image</th></tr>{table}</table>
<p>Adherence: share of images whose colour, shape, size and position all match the prompt (ldmkit.eval.scorer).
RMS to teacher 50: root-mean-square pixel difference to the teacher's 50-step image from the same noise
(per image; a multistep LCM re-noises between steps, so it leaves the teacher's path: read the 1-step row).
FD to teacher 50: Fréchet distance of the whole image set to the teacher's 50-step set (distribution level).
FD / KID to data: to {report["plan"]["reference_images"]} training images. Features: {html.escape(str(report.get("feature_net")))}
(a fixed random conv net, comparable only within ldmkit).
LCM 4 steps reaches {cell(figs.get("lcm4_over_teacher50_adherence"), "{:.0%}")} of the teacher's 50-step adherence and is
{cell(figs.get("lcm4_speedup_over_teacher50"), "{:.1f}")}x faster per image{" (a quick run: the quality figures mean nothing, see above)" if report["quick"] else ""}.</p>
<h2>Text conditioning</h2><pre>{html.escape(json.dumps(text, indent=1))}</pre>
<h2>Stages</h2><ul>{stages}</ul><table><tr><th>stage</th><th>time</th></tr>{stage_rows}</table>
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


QUICK_NOTICE = (
    '<p style="border:2px solid #c60;padding:8px;background:#fff4e5"><b>Quick run.</b> Every stage ran at a '
    "small size to check that it works; the teacher is far too short to learn the shapes, so adherence and FD "
    "below are near zero or noisy by design. Run <code>ldmkit quickstart</code> without <code>--quick</code> "
    "for figures that mean something.</p>"
)

ATTRIBUTES = ("all", "color", "shape", "size", "position")


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {round(seconds % 60)} s"


def what_next(report: dict[str, Any]) -> str:
    """A box with the commands to try the distilled model (generate) and bake it in (merge-lora)."""
    import shlex

    ex = report["exports"]
    teacher, student = (
        shlex.quote(str(Path(ex["teacher"]).resolve())),
        shlex.quote(str(Path(ex["distilled"]).resolve())),
    )
    prompt = shlex.quote("a large red circle in the center")
    if report["method"] == "lcd":
        lines = [f"ldmkit generate --model {student} --prompt {prompt} --out try"]
    else:
        lines = [
            f"ldmkit generate --model {teacher} --lora {student} --prompt {prompt} --out try",
            f"ldmkit merge-lora --model {teacher} --lora {student} --out merged",
        ]
    lines.append(
        f"ldmkit evaluate --model {teacher}"
        + ("" if report["method"] == "lcd" else f" --lora {student}")
        + " --shapes --out eval"
    )
    body = html.escape("\n".join(lines))
    return (
        '<div style="border:1px solid #888;padding:8px;background:#f4f8ff"><b>What next</b>: try the distilled model '
        f'(4 steps by default), bake it into the teacher, measure it again:<pre style="white-space:pre-wrap">{body}</pre></div>'
    )


def quality_charts(figs: dict[str, Any], lcm_steps: list[int]):
    """A row per measure (each attribute's adherence, then FD to the data) with two panels: against steps and
    against milliseconds per image; teacher (DDIM) and LCM lines."""
    from PIL import Image

    from ldmkit.eval.plot import line_chart

    def value(name: str, measure: str) -> float | None:
        if measure == "fd":
            return figs[name]["fd"]
        per = figs[name]["adherence_per_attribute"] or {}
        return per.get(measure)

    groups = {"teacher (DDIM)": ("teacher_4", "teacher_50"), "LCM": tuple(f"lcm_{s}" for s in lcm_steps)}
    measures = [m for m in (*ATTRIBUTES, "fd") if any(value(n, m) is not None for g in groups.values() for n in g)]
    rows = []
    for m in measures:
        title = (
            "FD to the data (lower is better)" if m == "fd" else f"adherence: {'all 4 attributes' if m == 'all' else m}"
        )
        y_range = None if m == "fd" else (0.0, 1.0)
        by_steps = {
            k: [(figs[n]["steps"], value(n, m)) for n in ns if value(n, m) is not None] for k, ns in groups.items()
        }
        by_ms = {
            k: [(figs[n]["seconds_per_image"] * 1000, value(n, m)) for n in ns if value(n, m) is not None]
            for k, ns in groups.items()
        }
        rows.append(
            (
                line_chart(by_steps, f"{title} vs steps", y_range=y_range, x_label="sampling steps"),
                line_chart(by_ms, f"{title} vs time", y_range=y_range, x_label="milliseconds per image"),
            )
        )
    pw, ph = rows[0][0].size if rows else (440, 300)
    sheet = Image.new("RGB", (2 * pw, max(1, len(rows)) * ph), "white")
    for i, (a, b) in enumerate(rows):
        sheet.paste(a, (0, i * ph))
        sheet.paste(b, (pw, i * ph))
    return sheet


def loss_curves(exports: dict[str, str]):
    """The training loss of each stage (its run folder's metrics.jsonl, next to its export), or None."""
    from PIL import Image

    from ldmkit.eval.plot import line_chart

    panels = []
    for stage in ("vae", "teacher", "distilled"):
        if stage not in exports:
            continue
        metrics = Path(exports[stage]).parent / "metrics.jsonl"
        if not metrics.is_file():
            continue
        points = []
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "loss" in record and "step" in record:
                points.append((record["step"], record["loss"]))
        if len(points) > 1:
            panels.append(line_chart({stage: points}, f"{stage}: training loss", x_label="training step", log_x=False))
    if not panels:
        return None
    pw, ph = panels[0].size
    sheet = Image.new("RGB", (len(panels) * pw, ph), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * pw, 0))
    return sheet
