"""Run folders as the report sees them: ``results.json``, each model's test predictions and its Optuna study.

Everything here is read-only over what ``dogbench run`` wrote; no torch import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from dogbench.errors import DogbenchError
from dogbench.evaluate import compare_paired
from dogbench.rundir import RunDir


class ReportError(DogbenchError, ValueError):
    """A run folder cannot be reported on."""


@dataclass(frozen=True)
class Trial:
    """One Optuna trial of a head search, as the history plot needs it."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING
    value: float | None  # validation top-1 (complete), or the last reported epoch's (pruned)
    head: str


@dataclass(frozen=True)
class Study:
    name: str
    trials: tuple[Trial, ...]
    importance: dict[str, float]  # Optuna's fANOVA importance over the complete trials; {} when not computable
    note: str = ""  # why something is missing


@dataclass(frozen=True)
class ModelRun:
    """One backbone of one run folder: its result record and its test predictions."""

    key: str  # display name: the label, or "<run>/<label>" when several runs are combined
    label: str
    run: str
    result: dict[str, Any]  # results.json "models"[label]
    sample_ids: np.ndarray  # (n,) str, test images in the evaluation's order
    y_true: np.ndarray  # (n,) int
    proba: np.ndarray  # (n, C) float32
    paths: np.ndarray  # (n,) str: the test image files
    classes: tuple[str, ...]
    study: Study | None
    boxes: np.ndarray  # (n, 4) int: the annotated box (x0, y0, x1, y1), -1s where there is none

    @property
    def y_pred(self) -> np.ndarray:
        return self.proba.argmax(axis=1)

    @property
    def correct(self) -> np.ndarray:
        return self.y_pred == self.y_true

@dataclass(frozen=True)
class RunFolder:
    path: Path
    name: str
    results: dict[str, Any]
    models: dict[str, ModelRun]
    explanations: list[dict[str, Any]] = field(default_factory=list)  # explanations.json records


def _load_study(run_dir: Path, results: dict[str, Any], study_name: str) -> Study | None:
    """The head search from its Optuna storage (the run's SQLite file unless the config names a server)."""
    import optuna

    storage = (results.get("config", {}).get("tune", {}) or {}).get("storage")
    if not storage:
        storage = RunDir(run_dir).default_storage()
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        # optuna would create an empty database there; a report only reads
        return Study(study_name, (), {}, note=f"its Optuna study is not here: {storage.removeprefix('sqlite:///')} "
                     "does not exist")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
        frozen = study.get_trials(deepcopy=False)
    except Exception as err:  # noqa: BLE001 - an unreachable or foreign storage leaves the section out, not the report
        return Study(study_name, (), {}, note=f"study not readable from {storage}: {type(err).__name__}: {err}")
    trials = []
    for t in frozen:
        value = t.value
        if value is None and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        trials.append(Trial(t.number, t.state.name, value, str(t.params.get("head", "?"))))
    importance: dict[str, float] = {}
    note = ""
    complete = [t for t in frozen if t.state.name == "COMPLETE"]
    if len(complete) >= 2:
        try:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            importance = dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
        except Exception as err:  # noqa: BLE001 - e.g. every complete trial had the same parameters
            note = f"parameter importance not computable: {err}"
    else:
        note = "parameter importance needs at least 2 complete trials"
    return Study(study_name, tuple(trials), importance, note)


def _load_model(run: RunDir, label: str, result: dict[str, Any], results: dict[str, Any]) -> ModelRun:
    if not run.predictions_path(label).is_file():
        raise ReportError(f"{run.predictions_path(label)} is missing: the run's evaluation did not finish; run "
                          f"`{run.rebuild('predictions')}` first")
    p = run.read_predictions(label)
    study_name = (result.get("head") or {}).get("study")
    study = _load_study(run.path, results, study_name) if study_name else None
    return ModelRun(label, label, run.path.name, result, p.sample_ids, p.y_true, p.proba, p.paths, p.classes, study,
                    p.boxes)


def load_run(run_dir: Path) -> RunFolder:
    """Read a finished run folder; errors say what is missing and which command makes it."""
    run = RunDir(run_dir)
    results = run.read_results().to_dict()
    models = {label: _load_model(run, label, r, results) for label, r in results["models"].items()}
    return RunFolder(run.path, run.path.name, results, models, run.read_explanations())


def load_runs(run_dirs: list[Path]) -> list[RunFolder]:
    """Several run folders; model keys become ``<run>/<label>`` when there is more than one (names made unique)."""
    if not run_dirs:
        raise ReportError("no run folder given")
    runs = [load_run(d) for d in run_dirs]
    if len(runs) > 1:
        seen: dict[str, int] = {}
        renamed = []
        for run in runs:
            seen[run.name] = seen.get(run.name, 0) + 1
            name = run.name if seen[run.name] == 1 else f"{run.name}~{seen[run.name]}"
            models = {
                f"{name}/{label}": dataclasses.replace(m, key=f"{name}/{label}", run=name)
                for label, m in run.models.items()
            }
            renamed.append(RunFolder(run.path, name, run.results, models, run.explanations))
        runs = renamed
    return runs


def all_models(runs: list[RunFolder]) -> list[ModelRun]:
    return [m for run in runs for m in run.models.values()]


def comparisons(runs: list[RunFolder], *, n_resamples: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Every run's own paired comparisons, then pairs across runs that scored the same test images."""
    out = []
    for run in runs:
        for comp in run.results.get("comparisons") or []:
            if len(runs) > 1:
                comp = {**comp, "a": f"{run.name}/{comp['a']}", "b": f"{run.name}/{comp['b']}"}
            out.append(comp)
    for ra, rb in combinations(runs, 2):
        if ra.results["dataset"].get("root") != rb.results["dataset"].get("root"):
            continue  # sample ids are paths inside the dataset: equal ids elsewhere are other photos
        for ma in ra.models.values():
            for mb in rb.models.values():
                if ma.classes != mb.classes:
                    continue
                shared, ia, ib = np.intersect1d(ma.sample_ids, mb.sample_ids, return_indices=True)
                if len(shared) == 0 or not np.array_equal(ma.y_true[ia], mb.y_true[ib]):
                    continue
                comp = compare_paired(ma.key, ma.correct[ia], mb.key, mb.correct[ib], n_resamples=n_resamples,
                                      seed=seed).to_dict()
                out.append({**comp, "across_runs": True})
    return out


def aligned(a: ModelRun, b: ModelRun) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the test images both models scored, in ``a``'s order."""
    _, ia, ib = np.intersect1d(a.sample_ids, b.sample_ids, return_indices=True)
    order = np.argsort(ia)
    return ia[order], ib[order]


def select_examples(models: list[ModelRun], *, n: int, seed: int) -> list[str]:
    """Sample ids of ``n`` test images for the predictions grid: right and wrong, balanced over agreement patterns.

    With two or more models the first two define four groups (both right, only the first, only the second, both
    wrong), drawn from in turn; with one model (or two that share no test image), the first's right and wrong.
    Seeded, so the grid and the explanations agree.
    """
    if n <= 0 or not models:
        return []
    rng = np.random.default_rng(seed)
    first = models[0]
    ia, ib = aligned(first, models[1]) if len(models) >= 2 else (np.array([], int), np.array([], int))
    if len(ia):
        ca, cb = first.correct[ia], models[1].correct[ib]
        groups = [ia[ca & cb], ia[ca & ~cb], ia[~ca & cb], ia[~ca & ~cb]]
    else:  # one model, or two runs without a test image in common
        groups = [np.flatnonzero(first.correct), np.flatnonzero(~first.correct)]
    pools = [list(rng.permutation(g)) for g in groups]
    chosen: list[int] = []
    while len(chosen) < n and any(pools):
        for pool in pools:
            if pool and len(chosen) < n:
                chosen.append(int(pool.pop()))
    return [str(first.sample_ids[i]) for i in chosen]
