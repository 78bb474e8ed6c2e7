"""The quickstart's report: headline figures (``summarise``) and ``report.json`` / ``report.html`` with
sample grids and quality charts (``write_report``)."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SOLVER_LABELS = {"ddim": "DDIM", "euler": "Euler", "heun": "Heun", "dpm": "DPM++ 2M", "unipc": "UniPC"}
"""How the report names the teacher's training-free solvers (ldmkit.diffusion.samplers.SCHEDULERS names; on a flow
teacher the same names are the flow solvers, samplers.FLOW_SCHEDULERS), in the report's order."""


def reference_solver(plan: Mapping[str, Any]) -> str:
    """The solver of the teacher's full-step reference set (``plan["reference_solver"]``: DDIM, a flow teacher's
    Euler; reports of older releases: DDIM)."""
    return plan.get("reference_solver", "ddim")


DISTANCE_ALIASES = {"teacher_ddim_4": ("teacher_4",)}
"""Figures that are the same setting under a second, older key (teacher_4 is teacher_ddim_4)."""


def _setting(run: dict[str, Any], steps: int) -> dict[str, Any] | None:
    return next((s for s in run["settings"] if s["steps"] == steps), None)


def summarise(results: dict[str, Any], plan: Mapping[str, Any], method: str | None = None) -> dict[str, Any]:
    """The headline figures under stable key names, from the evaluation ``results`` and the run's
    ``plan`` (``report["plan"]``: ``teacher_steps_full``, ``lcm_steps``):

    - ``teacher_50``: the teacher, guided DDIM at ``teacher_steps_full`` steps (the reference set);
    - ``teacher_<solver>_<steps>``: the teacher with each training-free solver it was evaluated with
      (``results["runs"]["teacher_<solver>"]``: ddim, dpm, unipc) at each other step count; ``teacher_4`` is
      ``teacher_ddim_4`` under its older name;
    - ``lcm_<steps>``: the distilled model, whatever its method (``method``, also stored in each of them);
    - ``lcm4_over_teacher50_adherence``, ``lcm4_speedup_over_teacher50``.
    """
    runs = results["runs"]
    full = plan["teacher_steps_full"]
    ref = reference_solver(plan)
    figures: dict[str, Any] = {}

    def put(name: str, s: dict[str, Any] | None) -> None:
        if s is None:
            return
        figures[name] = {
            "steps": s["steps"],
            "seconds_per_image": s["seconds_per_image"],
            "unet_evals_per_image": s["unet_evals_per_image"],
            "adherence": s["adherence"]["all"] if s.get("adherence") else None,
            "adherence_per_attribute": s.get("adherence"),
            "fd": s.get("fd"),
            "kid": s.get("kid"),
        }

    put("teacher_50", _setting(runs[f"teacher_{ref}"], full))
    put("teacher_4", _setting(runs[f"teacher_{ref}"], 4))
    for run_name, run in runs.items():
        if run_name.startswith("teacher_"):
            solver = run_name.removeprefix("teacher_")
            for s in run["settings"]:
                if (solver, s["steps"]) != (ref, full):
                    put(f"teacher_{solver}_{s['steps']}", s)
    for steps in plan["lcm_steps"]:
        put(f"lcm_{steps}", _setting(runs["lcm"], steps))
        if method is not None and f"lcm_{steps}" in figures:
            figures[f"lcm_{steps}"]["method"] = method
    aliases = {**DISTANCE_ALIASES, f"teacher_{ref}_4": ("teacher_4",)}
    for name, d in results["distance_to_teacher_50"].items():
        for target in (name, *aliases.get(name, ())):
            if target in figures:
                figures[target]["rms_to_teacher_50"], figures[target]["fd_to_teacher_50"] = d["rms"], d["fd"]
    lcm4 = figures.get("lcm_4")
    if lcm4 and figures["teacher_50"]["adherence"] is not None:
        figures["lcm4_over_teacher50_adherence"] = lcm4["adherence"] / max(figures["teacher_50"]["adherence"], 1e-9)
    if lcm4:
        figures["lcm4_speedup_over_teacher50"] = figures["teacher_50"]["seconds_per_image"] / lcm4["seconds_per_image"]
    return figures


def student_label(report: Mapping[str, Any]) -> str:
    """The distilled model's name in the report ("LCM-LoRA", "TCD", "PCM-LoRA", ...)."""
    return report.get("student") or report.get("method", "LCM")  # reports of older releases name no student


def teacher_solvers(figs: Mapping[str, Any]) -> list[str]:
    """The solvers the teacher was evaluated with, DDIM first (from the ``teacher_<solver>_<steps>`` keys)."""
    found = {k.split("_")[1] for k in figs if k.startswith("teacher_") and k.count("_") == 2}
    order = list(SOLVER_LABELS)
    return sorted(found, key=lambda s: (order.index(s) if s in order else len(order), s))


def setting_label(key: str, report: Mapping[str, Any]) -> str:
    """What a figure key is, without its steps: "teacher DDIM", "teacher UniPC", "TCD-LoRA"."""
    if key.startswith("lcm_"):
        return student_label(report)
    parts = key.split("_")
    solver = parts[1] if len(parts) == 3 else reference_solver(report.get("plan", {}))
    return f"teacher {SOLVER_LABELS.get(solver, solver)}"


def display_name(key: str, report: Mapping[str, Any]) -> str:
    """A figure or caption-adherence key as a reader sees it: "teacher DDIM 50 steps", "TCD-LoRA 4 steps"."""
    steps = key.rsplit("_", 1)[-1]
    if not steps.isdigit():
        return key
    return f"{setting_label(key, report)} {steps} step{'s' if steps != '1' else ''}"


def table_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(figure key, label) of each row of the report's table and the terminal's: the teacher's guided DDIM
    at full steps, then each solver at the student's step counts, then the student."""
    figs, plan = report["figures"], report["plan"]
    rows = [("teacher_50", setting_label("teacher_50", report))]
    for solver in teacher_solvers(figs):
        keys = [f"teacher_{solver}_{n}" for n in plan["lcm_steps"]]
        keys += sorted(
            (k for k in figs if k.startswith(f"teacher_{solver}_") and k not in keys),
            key=lambda k: int(k.rsplit("_", 1)[1]),
        )
        rows += [(k, setting_label(k, report)) for k in keys if k in figs]
    if len(rows) == 1 and "teacher_4" in figs:  # figures from before the solvers
        rows.append(("teacher_4", setting_label("teacher_4", report)))
    rows += [(f"lcm_{n}", student_label(report)) for n in plan["lcm_steps"] if f"lcm_{n}" in figs]
    return rows


def write_report(out: Path, report: dict[str, Any], results: dict[str, Any], eval_dir: Path) -> None:
    """``report.json`` (``report`` as it is) and ``report.html`` with its ``grids.png`` (the first prompts'
    images per setting: ``results["folders"]`` names each run's folder of ``steps-N`` image sets, else
    ``eval_dir/<run>``) and ``quality.png`` (quality against steps and time) in ``out``.

    ``report`` holds ``quick``, ``method``, ``student`` (its label), ``sampling``, ``plan``, ``plan_reason``,
    ``exports``, ``text_separation``, ``feature_net``, ``stage_seconds``, ``seconds_total`` and ``figures``
    (``summarise``); ``results`` the prompts.
    """
    (out / "report.json").write_text(json.dumps(report, indent=1))
    _sample_grid(_grid_rows(report, results, eval_dir), results["prompts"]).save(out / "grids.png")
    quality_charts(
        report["figures"], report["plan"]["lcm_steps"], student_label(report), reference_solver(report["plan"])
    ).save(out / "quality.png")
    losses = loss_curves(report["exports"])
    if losses is not None:
        losses.save(out / "losses.png")
    (out / "report.html").write_text(_report_html(report, results, losses=losses is not None))


def _grid_rows(report: Mapping[str, Any], results: dict[str, Any], eval_dir: Path) -> list[tuple[str, Path]]:
    """(label, folder of its images) of each row of ``grids.png``: the teacher at full steps, each of its solvers
    at few steps, the student at each of its step counts."""
    plan, figs = report["plan"], report["figures"]
    student = student_label(report)
    ev = Path(eval_dir)
    folders = results.get("folders", {})

    def folder(run: str) -> Path:
        return Path(folders.get(run, ev / run))

    full, ref = plan["teacher_steps_full"], reference_solver(plan)
    few = 4 if 4 in plan["lcm_steps"] else max(plan["lcm_steps"])  # the teacher's few-step row(s) of the grid
    rows = [
        (f"teacher {full} steps ({SOLVER_LABELS.get(ref, ref)}, guided)", folder(f"teacher_{ref}") / f"steps-{full}")
    ]
    for solver in teacher_solvers(figs) or [ref]:
        images = folder(f"teacher_{solver}") / f"steps-{few}"
        if images.is_dir():
            rows.append((f"teacher {few} steps ({SOLVER_LABELS.get(solver, solver)}, guided)", images))
    rows += [(f"{student} {s} step{'s' if s > 1 else ''}", folder("lcm") / f"steps-{s}") for s in plan["lcm_steps"]]
    return rows


def _sample_grid(rows: list[tuple[str, Path]], prompts: list[str]):
    """One row of images per (label, folder) in ``rows`` (``00000.png``, ...: the first 8 prompts, enlarged to
    about 96 pixels), labelled on the left, each column headed by its prompt."""
    from PIL import Image, ImageDraw

    cols = min(8, len(prompts))
    first = Image.open(rows[0][1] / "00000.png")
    w, h = first.size
    scale = max(1, 96 // w)
    label_w = 230
    grid = Image.new("RGB", (label_w + cols * w * scale, len(rows) * h * scale + 40), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        y = 40 + r * h * scale
        draw.text((6, y + h * scale // 2 - 6), label, fill="black")
        for c in range(cols):
            im = Image.open(images / f"{c:05d}.png").convert("RGB").resize((w * scale, h * scale), Image.NEAREST)
            grid.paste(im, (label_w + c * w * scale, y))
    for c in range(cols):
        words, lines = prompts[c].split(), [""]
        for word in words:  # wrap the prompt over the column
            if len(lines[-1]) + len(word) > 14 and lines[-1]:
                lines.append("")
            lines[-1] = f"{lines[-1]} {word}".strip()
        for k, line in enumerate(lines[:3]):
            draw.text((label_w + c * w * scale + 2, 2 + 12 * k), line, fill="black")
    return grid


def _cell(v: Any, fmt: str = "{:.3f}") -> str:
    return "" if v is None else fmt.format(v)


def _figures_table(report: Mapping[str, Any]) -> str:
    """The rows of the report's table of figures (``table_rows``), as HTML."""
    figs = report["figures"]
    cell = _cell
    return "".join(
        f"<tr><td>{html.escape(label)}</td><td>{figs[n]['steps']}</td><td>{cell(figs[n]['adherence'])}</td>"
        + "".join(
            f"<td>{cell((figs[n]['adherence_per_attribute'] or {}).get(a))}</td>"
            for a in ("color", "shape", "size", "position")
        )
        + f"<td>{cell(figs[n].get('rms_to_teacher_50'))}</td><td>{cell(figs[n].get('fd_to_teacher_50'), '{:.3f}')}</td>"
        f"<td>{cell(figs[n]['fd'], '{:.2f}')}</td><td>{cell(figs[n]['kid'], '{:.4f}')}</td>"
        f"<td>{cell(figs[n]['seconds_per_image'] * 1000, '{:.1f}')}</td><td>{cell(figs[n]['unet_evals_per_image'], '{:.0f}')}</td></tr>"
        for n, label in table_rows(report)
    )


def _report_html(report: dict[str, Any], results: dict[str, Any], losses: bool) -> str:
    """``report.html``: summary, plan, caption adherence, what next, the images (``grids.png``,
    ``quality.png``, with ``losses`` ``losses.png``), the table of figures, text conditioning and stages."""
    plan = report["plan"]
    student = student_label(report)
    figs = report["figures"]
    full = plan["teacher_steps_full"]
    cell = _cell
    table = _figures_table(report)
    stages = "".join(
        f"<li>{html.escape(k)}: <code>{html.escape(str(v))}</code></li>" for k, v in report["exports"].items()
    )
    text = report.get("text_separation", {})
    adherence_html = _caption_adherence_html(report.get("caption_adherence"), report)
    stage_rows = "".join(
        f'<tr class="stage"><td>{html.escape(k)}</td><td>{_duration(v)}</td></tr>'
        for k, v in report["stage_seconds"].items()
    )
    plan_html = (
        f"<p><b>Plan</b>: VAE {plan['vae_steps']}, teacher {plan['teacher_steps']}, distillation "
        f"{plan['distill_steps']} training steps. {html.escape(report['plan_reason'])}</p>"
        if report.get("plan_reason")
        else ""
    )
    solvers = [SOLVER_LABELS.get(s, s) for s in teacher_solvers(figs)]
    guided = f" at guidance {plan['teacher_guidance']:g}" if plan.get("teacher_guidance") is not None else ""
    flow = (
        " The teacher predicts the rectified-flow velocity (trained with SD3's objective, --objective flow); its "
        "solvers run on its shifted flow sigmas: Euler and Heun (diffusers' FlowMatchEulerDiscreteScheduler, "
        "FlowMatchHeunDiscreteScheduler; Heun evaluates twice per step but the last), DPM++ 2M and UniPC with "
        "use_flow_sigmas."
        if plan.get("objective") == "flow"
        else ""
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>ldmkit quickstart</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}}td:first-child{{text-align:left}}</style></head><body>
<h1>ldmkit quickstart report</h1>
<p>{"Quick run" if report["quick"] else "Run"}, {html.escape(student)} distillation (<code>{html.escape(report["method"])}</code>), {len(results["prompts"])} held-out prompts, same seeds for every setting.
Total time {report["seconds_total"] / 60:.1f} min.</p>
{plan_html}
{adherence_html}
{QUICK_NOTICE if report["quick"] else ""}
{what_next(report)}
<h2>Samples</h2><p>Same prompts and initial noise in every column.</p><img src="grids.png">
<h2>Quality against steps and time</h2><p>Each attribute's adherence, the FD to the data and the FD to the teacher's
{full}-step set, against sampling steps (left) and milliseconds per image (right): the teacher with each training-free
solver ({html.escape(", ".join(solvers))}) and the {html.escape(student)}.</p><img src="quality.png">
{'<h2>Training loss of each stage</h2><img src="losses.png">' if losses else ""}
<h2>Figures</h2><table><tr><th>setting</th><th>steps</th><th>adherence</th><th>colour</th><th>shape</th><th>size</th><th>position</th><th>RMS to teacher {full}</th><th>FD to teacher {full}</th><th>FD to data</th><th>KID to data</th><th>ms / image</th><th>UNet evals / image</th></tr>{table}</table>
<p>Teacher rows: the teacher sampled without distillation, guided{guided} (a
conditional and an unconditional UNet evaluation per step), with {html.escape(", ".join(solvers))} at the step counts of the
{html.escape(student)}; the {html.escape(student)} needs one evaluation per step.{html.escape(flow)}
Adherence: share of images whose colour, shape, size and position all match the prompt (ldmkit.eval.scorer).
RMS to teacher {full}: root-mean-square pixel difference to the teacher's {full}-step image from the same noise
(per image; a multistep consistency sampler re-noises between steps, so it leaves the teacher's path: read the 1-step row).
FD to teacher {full}: Fréchet distance of the whole image set to the teacher's {full}-step set (distribution level).
FD / KID to data: to {report["plan"]["reference_images"]} training images. Features: {html.escape(str(report.get("feature_net")))}
(a fixed random conv net, comparable only within ldmkit).
{html.escape(student)} 4 steps reaches {cell(figs.get("lcm4_over_teacher50_adherence"), "{:.0%}")} of the teacher's {full}-step adherence and is
{cell(figs.get("lcm4_speedup_over_teacher50"), "{:.1f}")}x faster per image{" (a quick run: the quality figures mean nothing, see above)" if report["quick"] else ""}.</p>
<h2>Text conditioning</h2><pre>{html.escape(json.dumps(text, indent=1))}</pre>
<h2>Stages</h2><ul>{stages}</ul><table><tr><th>stage</th><th>time</th></tr>{stage_rows}</table>
</body></html>"""


def _caption_adherence_html(adh: dict[str, Any] | None, report: Mapping[str, Any] | None = None) -> str:
    """The "do samples follow their captions?" block: warnings first (visible at the top of the report),
    then caption sensitivity and label accuracy per model (ldmkit.eval.adherence)."""
    if not adh:
        return ""

    def shown(name: str) -> str:
        return display_name(name, report) if report is not None else name

    warnings = "".join(
        f'<p style="background:#fdd;padding:8px;border-left:4px solid #c00"><b>Warning ({html.escape(shown(name))}):</b> '
        f"{html.escape(entry['warning'])}</p>"
        for name, entry in adh["models"].items()
        if entry.get("warning")
    )
    labelled = adh.get("labels") is not None
    head = "<tr><th>model</th><th>caption sensitivity</th><th>caption distance</th><th>seed distance</th>"
    head += "<th>label accuracy</th></tr>" if labelled else "</tr>"
    rows = "".join(
        f"<tr><td>{html.escape(shown(name))}</td><td>{e['sensitivity']:.2f}</td><td>{e['caption_distance']:.3f}</td>"
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
    """A box with the commands to try the distilled model (generate), bake a LoRA into the teacher
    (merge-lora) and measure it again (evaluate), sampled as the quickstart sampled it (``report["sampling"]``)."""
    import shlex

    ex = report["exports"]
    teacher, student = (
        shlex.quote(str(Path(ex["teacher"]).resolve())),
        shlex.quote(str(Path(ex["distilled"]).resolve())),
    )
    sampling = report.get("sampling") or {"scheduler": "lcm", "eta": None, "lora": True}  # older reports
    lora = sampling["lora"]
    flags, steps = [], []
    if sampling.get("recorded"):
        # The export's sampling record gives generate and evaluate its sampler, steps, eta and guidance; only a
        # guidance the quickstart chose otherwise (a full student judged at the teacher's w) is said.
        if sampling.get("guidance") not in (None, sampling.get("record_guidance")):
            flags.append(f"--guidance {sampling['guidance']:g}")
    else:
        # An export without a record (older ldmkit): generate's defaults fit an LCM-LoRA (LCM sampler from the
        # export, 4 steps, guidance 1); anything else says its sampler, steps and guidance.
        if sampling["scheduler"] != "lcm":
            flags.append(f"--scheduler {sampling['scheduler']}")
        if sampling.get("eta") is not None:
            flags.append(f"--eta {sampling['eta']:g}")
        if sampling.get("guidance") is not None and not (lora and sampling["scheduler"] == "lcm"):
            flags.append(f"--guidance {sampling['guidance']:g}")
        steps = [] if sampling["scheduler"] == "lcm" else ["--steps 4"]
    model = f"--model {teacher} --lora {student}" if lora else f"--model {student}"
    prompt = shlex.quote("a large red circle in the center")
    lines = [" ".join(["ldmkit generate", model, *flags, *steps, f"--prompt {prompt} --out try"])]
    if lora:
        lines.append(f"ldmkit merge-lora --model {teacher} --lora {student} --out merged")
    lines.append(" ".join(["ldmkit evaluate", model, *flags, "--shapes --out eval"]))
    body = html.escape("\n".join(lines))
    return (
        '<div style="border:1px solid #888;padding:8px;background:#f4f8ff"><b>What next</b>: try the distilled model '
        f"(4 steps), {'bake it into the teacher, ' if lora else ''}measure it again:"
        f'<pre style="white-space:pre-wrap">{body}</pre></div>'
    )


def quality_charts(figs: dict[str, Any], lcm_steps: list[int], student: str = "LCM", reference: str = "ddim"):
    """A row per measure (each attribute's adherence, FD to the data, FD to the teacher's full-step set) with
    two panels: against steps and against milliseconds per image; a line per teacher solver and the student."""
    from PIL import Image

    from ldmkit.eval.plot import line_chart

    def value(name: str, measure: str) -> float | None:
        if measure in ("fd", "fd_to_teacher_50"):
            return figs[name].get(measure)
        per = figs[name]["adherence_per_attribute"] or {}
        return per.get(measure)

    groups: dict[str, tuple[str, ...]] = {}
    for solver in teacher_solvers(figs) or [reference]:
        keys = [k for k in figs if k.startswith(f"teacher_{solver}_")]
        if solver == reference and "teacher_50" in figs:
            keys.append("teacher_50")  # its full-step point
        groups[f"teacher ({SOLVER_LABELS.get(solver, solver)})"] = tuple(keys)
    groups[student] = tuple(f"lcm_{s}" for s in lcm_steps if f"lcm_{s}" in figs)
    titles = {"fd": "FD to the data (lower is better)", "fd_to_teacher_50": "FD to the teacher's full-step set"}
    measures = [
        m
        for m in (*ATTRIBUTES, "fd", "fd_to_teacher_50")
        if any(value(n, m) is not None for g in groups.values() for n in g)
    ]
    rows = []
    for m in measures:
        title = titles.get(m) or f"adherence: {'all 4 attributes' if m == 'all' else m}"
        y_range = None if m in titles else (0.0, 1.0)
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
