"""The commands over the run folder: ``tune``, ``evaluate`` and ``run`` (the frozen protocol's stages, under the
folder's lock, with its config as the source of truth) and the report stage (explanations + report files).

What a stage hands to the next is written into the run folder (``rundir``), so stages can run in separate
processes, give the same ``results.json`` as one ``run``, and nothing computed is lost when a later stage fails.

Under torchrun these commands run on rank 0, which holds the run folder's lock and alone writes it; it announces
each extraction and each fine-tuning job, and the other ranks (``follow``) join just those. Tuning heads, the
baseline, evaluation and the report run once, on rank 0, over the features every rank helped extract.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dogbench import distributed, track
from dogbench.config import ReportConfig, RunConfig
from dogbench.data import Dataset
from dogbench.device import resolve_device
from dogbench.errors import DogbenchError
from dogbench.protocols.efficiency import add_data_efficiency
from dogbench.protocols.finetune import TrainJob, finetune_stage, run_job
from dogbench.protocols.frozen import (
    BackboneFeatures,
    Tuning,
    evaluate_stage,
    extract_stage,
    load_tuning,
    tune_backbone,
)
from dogbench.protocols.looks import record_looks
from dogbench.protocols.seeds import add_seeds
from dogbench.results import RunResults
from dogbench.rundir import REPORT_HTML, SUMMARY_FILE, RunDir, new_run_dir
from dogbench.training import TrainingError

if TYPE_CHECKING:
    from dogbench.report import ReportFiles
    from dogbench.report.runs import ModelRun


def check_devices(cfg: RunConfig) -> None:
    """The configured devices exist on this machine (DogbenchError naming the valid ones otherwise)."""
    for device in (cfg.features.device, cfg.tune.device):
        resolve_device(device)


def follow() -> None:
    """A rank other than 0 under torchrun: extract and train with rank 0 whatever it announces, until it
    announces the end (when rank 0 fails instead, torchrun stops this process)."""
    while True:
        kind, payload = distributed.receive()
        if kind == "extract":
            settled, dataset = payload
            extract_stage(settled, dataset, progress=False)
        elif kind == "train":
            if not isinstance(payload, TrainJob):
                raise DogbenchError(f"rank 0 announced a training without its job ({type(payload).__name__})")
            try:
                run_job(payload, progress=False)
            except TrainingError:
                continue  # a diverging loss: every rank saw the same averaged loss, rank 0 decides what follows
        elif kind == "done":
            return
        else:
            raise DogbenchError(f"rank 0 announced {kind!r}; a rank knows extract, train and done (are all ranks "
                                "running the same dogbench version?)")


def _extract(cfg: RunConfig, dataset: Dataset, *, progress: bool) -> dict[str, BackboneFeatures]:
    """The features of every backbone: under torchrun every rank extracts its share of them (rank 0 tells the
    others, with the folder's settled config and the dataset)."""
    distributed.announce("extract", (cfg, dataset))
    return extract_stage(cfg, dataset, progress=progress)


def run_folder(cfg: RunConfig) -> RunDir:
    """The run folder ``cfg.out`` names, or a new ``runs/<timestamp>``."""
    return RunDir(cfg.out) if cfg.out else new_run_dir()


def tune(
    cfg: RunConfig, dataset: Dataset, *, progress: bool = True, force: bool = False
) -> tuple[dict[str, Tuning], Path]:
    """``dogbench tune``: features (cached) and tuning; the run folder gets config.json and the tunings."""
    run = run_folder(cfg)
    with run.lock(), track.session(cfg, run.path):
        _, _, tunings = _extract_and_tune(cfg, run, dataset, progress=progress, force=force)
    return tunings, run.path


def _extract_and_tune(
    cfg: RunConfig, run: RunDir, dataset: Dataset, *, progress: bool, force: bool
) -> tuple[RunConfig, dict[str, BackboneFeatures], dict[str, Tuning]]:
    """Under the run's lock: devices checked, the folder's config settled, features, tunings (``tune`` and ``run``)."""
    check_devices(cfg)  # before the config is written: a refused device must not stick to the folder
    cfg = run.settle_config(cfg, force=force)
    extracted = _extract(cfg, dataset, progress=progress)
    tunings = {label: tune_backbone(cfg, run, label, bf, progress=progress) for label, bf in extracted.items()}
    return cfg, extracted, tunings


def evaluate(
    cfg: RunConfig, dataset: Dataset, *, data_s: float = 0.0, start: float | None = None, progress: bool = True
) -> tuple[RunResults, Path]:
    """``dogbench evaluate``: the tunings of an existing run folder, evaluated on its features."""
    start = time.perf_counter() if start is None else start
    if not cfg.out:
        raise DogbenchError("dogbench evaluate needs the run folder that `dogbench tune` wrote: `dogbench evaluate R`")
    run = RunDir(cfg.out)
    with run.lock(), track.session(cfg, run.path):
        check_devices(cfg)
        cfg = run.settle_config(cfg)
        missing = [b.label for b in cfg.backbones if not run.tuning_path(b.label).is_file()]
        if missing:  # before any extraction, which can take hours
            raise DogbenchError(f"{', '.join(str(run.tuning_path(m)) for m in missing)} missing: run "
                                f"`{run.rebuild('tuning')}` first")
        extracted = _extract(cfg, dataset, progress=progress)
        tuning = {label: load_tuning(cfg, run, label, bf) for label, bf in extracted.items()}
        results = _evaluate_and_report(cfg, run, dataset, extracted, tuning, data_s=data_s, start=start,
                                       progress=progress)
    return results, run.path


def run(
    cfg: RunConfig, dataset: Dataset, *, data_s: float = 0.0, start: float | None = None, progress: bool = True,
    force: bool = False,
) -> tuple[RunResults, Path]:
    """The main job: features (cached), tuning, evaluation; everything lands in the run folder.

    ``data_s`` and ``start`` let a caller that opened the dataset itself count that in the timings.
    """
    start = time.perf_counter() if start is None else start
    run = run_folder(cfg)
    with run.lock(), track.session(cfg, run.path):
        cfg, extracted, tuning = _extract_and_tune(cfg, run, dataset, progress=progress, force=force)
        results = _evaluate_and_report(cfg, run, dataset, extracted, tuning, data_s=data_s, start=start,
                                       progress=progress)
    return results, run.path


def _evaluate_and_report(
    cfg: RunConfig, run: RunDir, dataset: Dataset, extracted: dict[str, BackboneFeatures], tuning: dict[str, Tuning],
    *, data_s: float, start: float, progress: bool,
) -> RunResults:
    """Evaluation, the fine-tuning methods, then the repetitions over seeds and the data-efficiency curves when
    asked, then the report."""
    results = evaluate_stage(cfg, run, dataset, extracted, tuning, data_s=data_s, start=start)
    results = finetune_stage(cfg, run, dataset, extracted, tuning, results, progress=progress)
    if cfg.evaluate.seeds > 1:
        results = add_seeds(cfg, run, results, extracted, progress=progress)
    if cfg.shots.shots:
        results = add_data_efficiency(cfg, run, results, extracted, progress=progress)
    results = record_looks(cfg, run, dataset, results)  # the test-set ledger: one look, each model row in it
    _report_after(cfg, run.path, progress=progress)
    track.active().finish(_finals(run, results))
    return results


def _finals(run: RunDir, results: RunResults) -> track.Finals:
    """What the trackers get at the end: the results, the run's files, the report's figures of each row."""
    from dogbench.report.document import FILES_DIR

    figures: dict[str, dict[str, Path]] = {"confusion": {}, "reliability": {}}
    for label in results.models:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)  # as the report names its files
        for kind, rows in figures.items():
            path = run.path / FILES_DIR / f"{kind}-{safe}.png"
            if path.is_file():
                rows[label] = path
    files = (run.results_path, run.path / SUMMARY_FILE, run.path / REPORT_HTML)
    return track.Finals(json.loads(run.results_path.read_text()), files, figures)


def _report_after(cfg: RunConfig, run_dir: Path, *, progress: bool) -> None:
    """The report at the end of ``run`` / ``evaluate``; a failure there keeps the results already written."""
    if not cfg.report.enabled:
        return
    try:
        report_stage([run_dir], run_dir, cfg.report, progress=progress)
    except DogbenchError as err:
        raise DogbenchError(f"{err}\nThe results are saved in {run_dir}; only the report is missing: fix the above "
                            f"and run `dogbench report {run_dir}` (`--explain 0` loads no model)") from err


def explain_examples(run_dir: Path, first: ModelRun, ids: list[str], *, device: str) -> list[dict[str, Any]]:
    """Attention rollout / Grad-CAM overlays of the test images ``ids`` (rows of ``first``, the run's first model)
    for every model of a run folder, into ``<run_dir>/explanations/`` with ``explanations.json``."""
    from dogbench.explain import explain_run
    from dogbench.inference import load_run

    row_of = {sid: i for i, sid in enumerate(first.sample_ids)}
    rows = [row_of[i] for i in ids if Path(first.paths[row_of[i]]).is_file()]
    if not rows:
        raise DogbenchError(f"none of the {len(ids)} test images to explain is where the run read it (first: "
                            f"{first.paths[row_of[ids[0]]] if ids else '-'})")
    images = [(Path(first.paths[r]), tuple(int(v) for v in first.boxes[r]) if first.boxes[r][0] >= 0 else None)
              for r in rows]
    loaded = load_run(run_dir, device=device)
    extra = [{"sample_id": str(first.sample_ids[r]),
              "caption": f"{Path(first.paths[r]).name}: true breed {loaded.classes[first.y_true[r]]}"} for r in rows]
    return explain_run(loaded, images, RunDir(run_dir).explanations_dir, extra=extra)


def report_stage(run_dirs: list[Path], out_dir: Path, cfg: ReportConfig, *, progress: bool = True) -> ReportFiles:
    """Explain the grid's first ``cfg.explain`` test images where a run has no explanations of them yet, then
    write the report (``report.html``, ``report.md``) into ``out_dir``. Explanations that cannot be made (a
    moved image or weights file) leave a note in the report instead of stopping it."""
    from dogbench.report import build_report, load_runs, select_examples, write_report

    runs = load_runs(list(run_dirs))
    notes: list[str] = []
    if cfg.explain > 0:
        for i, run in enumerate(runs):
            models = list(run.models.values())
            ids = select_examples(models, n=cfg.examples, seed=cfg.seed)[: cfg.explain]
            explained = [r.get("sample_id") for r in run.explanations[:: len(models)]]
            heads = {label: RunDir(run.path).head_digest(label) for label in run.models}
            if explained == ids and all(r.get("calibrated") and r.get("head") == heads.get(r["label"])
                                        for r in run.explanations):
                continue  # these very images, explained with today's heads (predict's calibrated top-3)
            try:
                device = str(resolve_device(RunDir(run.path).read_config().features.device))
                if progress:
                    print(f"explaining {len(ids)} test images for {', '.join(run.models)} ({run.path})",
                          file=sys.stderr)
                runs[i] = dataclasses.replace(run, explanations=explain_examples(run.path, models[0], ids,
                                                                                 device=device))
            except (DogbenchError, OSError) as err:
                notes.append(f"{run.name}: no explanations ({err}).")
    report = build_report(runs, examples=cfg.examples, confused_pairs=cfg.confused_pairs, seed=cfg.seed, notes=notes)
    return write_report(report, out_dir)
