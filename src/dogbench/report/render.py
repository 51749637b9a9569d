"""Assemble the report from run folders and write it twice: ``report.html`` (self-contained, every image embedded
as a data URI, opens offline) and ``report.md`` with its PNG/JPEG files in ``report_files/``.

The content is built once as a ``document.Report`` by the section builders; the HTML template and the Markdown
writer only lay it out. No torch import.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader

from dogbench.atomic import atomic_write_bytes, atomic_write_text
from dogbench.report import plots, why
from dogbench.report.document import FILES_DIR, Assets, Cards, Cell, Figure, Image, Report, Table
from dogbench.report.runs import ModelRun, RunFolder, all_models, comparisons, load_runs, select_examples
from dogbench.report.sections import (
    accuracy_section,
    architecture_section,
    calibration_section,
    comparable_pair,
    confusion_section,
    details_section,
    examples_section,
    explanations_section,
    per_breed_section,
    summary_section,
)
from dogbench.report.sections_studies import (
    efficiency_section,
    extra_test_section,
    ladder_section,
    seeds_section,
    tuning_section,
)
from dogbench.results import verdict, verdict_of_many
from dogbench.rundir import REPORT_HTML, REPORT_JSON, REPORT_MD


def _verdicts(runs: list[RunFolder], comps: list[dict[str, Any]], models: list[ModelRun]) -> list[str]:
    """Each run's headline comparison (its two backbones; with more, the best by validation against each other,
    Holm-corrected), then models of the same label across runs, each
    fine-tuned model against its frozen head, each model with and without test-time augmentation; the models named
    as readers know them, their labels in brackets."""
    names = why.model_names(models)
    out = []
    for run in runs:
        c = run.results.get("comparison")
        if run.results.get("best_vs_rest"):
            prefix = f"{run.name}: " if len(runs) > 1 else ""
            out.append(prefix + verdict_of_many(run.results["best_vs_rest"], names))
        elif c:
            prefix = f"{run.name}: " if len(runs) > 1 else ""
            if len(runs) > 1:
                c = {**c, "a": f"{run.name}/{c['a']}", "b": f"{run.name}/{c['b']}"}
            out.append(prefix + verdict(c, names))
    tuned = {m.key: m.result["training"]["base"] for m in models if m.result.get("method", "frozen") != "frozen"}
    for c in comps:
        if c.get("across_runs") and c["a"].split("/", 1)[1] == c["b"].split("/", 1)[1]:
            out.append("Across runs: " + verdict(c, names))
        elif c["a"] in tuned and c["b"].endswith(tuned[c["a"]]) and not c.get("across_runs"):
            out.append("Fine-tuning: " + verdict(c, names))
        elif c.get("tta"):  # a model with its test-time views against itself on one view (protocols.tta)
            out.append("Test-time augmentation: " + verdict(c, names))
    if not out:
        out = ["Only one model: nothing to compare." if len(models) < 2 else
               f"{len(models)} models, but no two of them scored the same test images with the same classes: "
               "nothing to compare pairwise."]
    return out


def headline(runs: list[RunFolder]) -> tuple[list[str], list[str]]:
    """The report's verdict sentences and caveats (the ImageNet overlap among them), without building the rest:
    what ``dogbench serve`` puts on its page."""
    return _verdicts(runs, comparisons(runs), all_models(runs)), why.caveats(runs)


def build_report(runs: list[RunFolder], *, examples: int = 12, confused_pairs: int = 8, seed: int = 0,
                 notes: Sequence[str] = ()) -> Report:
    """Everything the report shows, from loaded run folders."""
    models = all_models(runs)
    colours = plots.palette([m.key for m in models])
    assets = Assets()
    comps = comparisons(runs)
    sections = [summary_section(models, comps), accuracy_section(models, assets, colours)]
    pair = comparable_pair(models)
    if pair is not None:
        sections.append(per_breed_section(*pair, assets, colours))
    sections.append(confusion_section(models, assets, pairs=confused_pairs))
    frozen = [m for m in models if m.result.get("method", "frozen") == "frozen"]
    ids = select_examples(models, n=examples, seed=seed)
    optional = (ladder_section(models, comps, assets), tuning_section(frozen, assets), seeds_section(runs),
                efficiency_section(runs, assets, colours), extra_test_section(runs),
                calibration_section(models, assets), examples_section(models, ids, assets) if ids else None,
                explanations_section(runs, assets, notes), architecture_section(models), details_section(runs))
    sections += [s for s in optional if s is not None]
    datasets = sorted({r.results["dataset"]["name"] for r in runs})
    ds = runs[0].results["dataset"]
    subtitle = (f"{', '.join(datasets)}: {ds['n_train']} train / {ds['n_val']} val / {ds['n_test']} test images, "
                f"{ds['n_classes']} classes" + (f"; {len(runs)} runs combined" if len(runs) > 1 else ""))
    names = why.model_names(models)
    reasons = [s for run in runs for s in why.why(run)]
    return Report(why.title(models, names), subtitle, _verdicts(runs, comps, models), why.caveats(runs), sections,
                  assets.files, who=[names[m.key].full for m in models], why=reasons)


# ---------------------------------------------------------------- writers


def _data_uri(name: str, data: bytes) -> str:
    mime = "image/png" if name.endswith(".png") else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def render_html(report: Report) -> str:
    env = Environment(loader=PackageLoader("dogbench.report", "templates"), autoescape=True)
    env.filters["data_uri"] = lambda image: _data_uri(image.name, report.files[image.name])
    env.tests["image"] = lambda x: isinstance(x, Image)
    env.tests["lines"] = lambda x: isinstance(x, list)
    env.tests["figure"] = lambda x: isinstance(x, Figure)
    env.tests["table"] = lambda x: isinstance(x, Table)
    env.tests["cards"] = lambda x: isinstance(x, Cards)
    return env.get_template("report.html.j2").render(report=report)


def _md_escape(text: str) -> str:
    """Text that Markdown shows as it is: table pipes, emphasis, links and HTML characters escaped."""
    for ch in "\\`*_[]<>|":
        text = text.replace(ch, "\\" + ch)
    return text.replace("\n", " ")


def _md_cell(cell: Cell) -> str:
    if isinstance(cell, Image):
        return f"![{_md_escape(cell.alt)}]({FILES_DIR}/{cell.name})"
    if isinstance(cell, list):
        return "<br>".join(_md_escape(("✔ " if x.ok else "✘ " if x.ok is False else "") + x.text) for x in cell)
    return _md_escape(cell)


def _md_table(table: Table) -> list[str]:
    out = [f"*{_md_escape(table.caption)}*", ""] if table.caption else []
    out += ["| " + " | ".join(_md_escape(h) for h in table.header) + " |", "|" + "---|" * len(table.header)]
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return [*out, ""]


def render_markdown(report: Report) -> str:
    lines = [f"# {_md_escape(report.title)}", "", f"{_md_escape(report.subtitle)}  ",
             f"dogbench {report.version}, {report.created}", ""]
    for v in report.verdicts:
        lines += [f"**{_md_escape(v)}**", ""]
    lines += [f"- {_md_escape(w)}" for w in report.who] + ([""] if report.who else [])
    if report.why:
        lines += [f"**Why.** {_md_escape(' '.join(report.why))}", ""]
    for c in report.caveats:
        lines += [f"> **Caveat.** {_md_escape(c)}", ""]
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        for p in section.paragraphs:
            lines += [_md_escape(p), ""]
        for block in section.blocks:
            if isinstance(block, Figure):
                lines += [_md_cell(block.image), "", f"*{_md_escape(block.caption)}*", ""]
                if block.full:
                    lines += [f"[Full size, every breed named]({FILES_DIR}/{block.full.name})", ""]
            elif isinstance(block, Table):
                lines += _md_table(block)
            else:
                table = Table(["image", "truth", "predictions (top-3)"],
                              [[c.image or "(image not readable)", c.title, c.lines] for c in block.cards])
                lines += _md_table(table)
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    markdown: Path
    files_dir: Path
    verdicts: list[str]


def write_report(report: Report, out_dir: Path) -> ReportFiles:
    """``report.html`` (self-contained), ``report.md`` and ``report_files/`` in ``out_dir``, each written atomically."""
    out_dir = Path(out_dir)
    files_dir = out_dir / FILES_DIR
    files_dir.mkdir(parents=True, exist_ok=True)
    for name, data in report.files.items():
        atomic_write_bytes(files_dir / name, data)
    atomic_write_text(out_dir / REPORT_MD, render_markdown(report))
    atomic_write_text(out_dir / REPORT_HTML, render_html(report))
    atomic_write_text(out_dir / REPORT_JSON, json.dumps({"title": report.title, "verdicts": report.verdicts,
                                                           "caveats": report.caveats,
                                                           "sections": [s.title for s in report.sections],
                                                           "files": sorted(report.files)}, indent=2) + "\n")
    return ReportFiles(out_dir / REPORT_HTML, out_dir / REPORT_MD, files_dir, report.verdicts)


def make_report(run_dirs: Sequence[Path], out_dir: Path, *, examples: int = 12, confused_pairs: int = 8,
                seed: int = 0, notes: Sequence[str] = ()) -> ReportFiles:
    """Load run folders, build the report, write it into ``out_dir``; ``notes`` say what could not be explained."""
    runs = load_runs([Path(d) for d in run_dirs])
    report = build_report(runs, examples=examples, confused_pairs=confused_pairs, seed=seed, notes=notes)
    return write_report(report, out_dir)


__all__ = ["ReportFiles", "build_report", "headline", "make_report", "render_html", "render_markdown", "write_report"]
