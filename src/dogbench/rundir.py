"""The run folder: its layout, typed readers and writers of everything in it, its lock, and its config as the
source of truth for every stage that is given it. No torch import (the report reads run folders through here).

Layout (``R`` = the run folder)::

    R/config.json                    the resolved config (RunConfig.to_dict); every later stage reads it
    R/results.json, results.csv      the evaluation (results.RunResults), summary.txt (the printed table)
    R/optuna.db                      the head studies (SQLite, unless tune.storage names a server)
    R/<label>/tuning.json            the tune stage's output for one backbone
    R/<label>/head/                  head.json + head.safetensors (heads.load_head)
    R/<label>/predictions.npz        test ids, labels, probabilities, confusion, paths, boxes, classes
    R/<label>/<method>/              a fine-tuned model (row "<label>/<method>"): model.json, backbone.safetensors
                                     (LoRA merged), adapter.safetensors (LoRA), head/, predictions.npz, train/<key>/
                                     (state.pt, best-epoch<N>.safetensors, params.json: one per trained configuration)
    R/explanations/                  the report's overlays + explanations.json (`dogbench explain` writes to
                                     ./explanations/<run> instead, never into the run folder)
    R/report.html, report.md, report.json, report_files/
    R/.lock                          held by a process writing into the folder

A file that is missing or unreadable stops with a ``RunFolderError`` that names it and the command that
rebuilds it; nothing else in the folder is touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from dogbench.atomic import atomic_write_json, atomic_write_text, atomic_write_with
from dogbench.config import RunConfig, config_differences, from_mapping, saved_to_doc
from dogbench.errors import DogbenchError
from dogbench.locks import locked
from dogbench.results import RunResults

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
RESULTS_CSV = "results.csv"
SUMMARY_FILE = "summary.txt"
REPORT_HTML = "report.html"  # the report (dogbench.report) writes these into a run folder, or a folder of its own
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
TUNING_FILE = "tuning.json"
HEAD_DIR = "head"
PREDICTIONS_FILE = "predictions.npz"
EXPLANATIONS_DIR = "explanations"
EXPLANATIONS_FILE = "explanations.json"
OPTUNA_FILE = "optuna.db"
FINETUNED_FILE = "model.json"  # what a fine-tuned model is: base backbone, method, training record
FINETUNED_WEIGHTS = "backbone.safetensors"
ADAPTER_FILE = "adapter.safetensors"
TRAIN_DIR = "train"  # <label>/<method>/train/<key>/: one folder per trained configuration
TRAIN_STATE_FILE = "state.pt"  # the resumable training state
TRAIN_PARAMS_FILE = "params.json"  # the configuration's resolved parameters and its state's digest
BEST_EPOCH_FILE = "best-epoch{epoch}.safetensors"  # the best epoch's weights (the state names the epoch)
NO_BOX = (-1, -1, -1, -1)  # predictions.npz "boxes" row of an image without an annotated box
PREDICTION_ARRAYS = ("sample_ids", "y_true", "proba", "confusion", "paths", "boxes", "classes")

T = TypeVar("T")


class RunFolderError(DogbenchError, ValueError):
    """A run folder, or a file in it, that is missing, unreadable or does not fit the rest of the folder."""


@dataclass(frozen=True)
class Predictions:
    """One model's test predictions, as ``<label>/predictions.npz`` holds them (rows in the evaluation's order)."""

    sample_ids: np.ndarray  # (n,) str
    y_true: np.ndarray  # (n,) int64
    proba: np.ndarray  # (n, C) float32, columns = classes
    confusion: np.ndarray  # (C, C) int64
    paths: np.ndarray  # (n,) str: the image files the run read
    boxes: np.ndarray  # (n, 4) int64: annotated box (x0, y0, x1, y1), NO_BOX where there is none
    classes: tuple[str, ...]
    proba_uncalibrated: np.ndarray | None = None  # (n, C) before temperature scaling; ``proba`` is after it

    def check(self) -> None:
        n = len(self.sample_ids)
        if (self.proba.shape != (n, len(self.classes)) or self.y_true.shape != (n,) or self.paths.shape != (n,)
                or self.boxes.shape != (n, 4)):
            raise ValueError(f"{n} ids, proba {self.proba.shape}, {len(self.classes)} classes, boxes "
                             f"{self.boxes.shape}")


class RunDir:
    """One run folder: paths, typed readers (errors name the file and its rebuild command) and writers."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------ layout
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def explanations_dir(self) -> Path:
        return self.path / EXPLANATIONS_DIR

    def tuning_path(self, label: str) -> Path:
        return self.path / label / TUNING_FILE

    def head_dir(self, label: str) -> Path:
        return self.path / label / HEAD_DIR

    def head_digest(self, label: str) -> str:
        """sha256 over ``label``'s head files (its weights, temperature, identity); "" without a head. What
        explanations record, so that a refitted or recalibrated head makes them stale."""
        folder = self.head_dir(label)
        files = sorted(f for f in folder.iterdir() if f.is_file()) if folder.is_dir() else []
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
        return digest.hexdigest() if files else ""

    def predictions_path(self, label: str) -> Path:
        return self.path / label / PREDICTIONS_FILE

    def finetuned_dir(self, label: str, method: str) -> Path:
        """A fine-tuned model's folder; its row, head and predictions are those of label ``<label>/<method>``."""
        return self.path / label / method

    def train_dir(self, label: str, method: str) -> Path:
        """The folder of every configuration trained for ``<label>/<method>`` (one ``<key>/`` each)."""
        return self.finetuned_dir(label, method) / TRAIN_DIR

    def read_finetuned(self, label: str, method: str) -> dict[str, Any] | None:
        """``<label>/<method>/model.json``, or None when that model has not been fine-tuned here."""
        path = self.finetuned_dir(label, method) / FINETUNED_FILE
        if not path.is_file():
            return None

        def record(d: Any) -> dict[str, Any]:
            if not isinstance(d, dict) or not {"method", "backbone", "weights_sha256"} <= set(d):
                raise TypeError("expected a fine-tuned model record")
            return d

        return self._read_json(path, "finetune", record)

    def write_finetuned(self, label: str, method: str, record: Mapping[str, Any]) -> None:
        atomic_write_json(self.finetuned_dir(label, method) / FINETUNED_FILE, dict(record))

    def default_storage(self) -> str:
        return f"sqlite:///{(self.path / OPTUNA_FILE).resolve()}"

    def exists(self) -> bool:
        """Whether this is a run folder already (it has its config)."""
        return self.config_path.is_file()

    def rebuild(self, what: str) -> str:
        """The command that writes ``what`` (a file of this folder) again."""
        commands = {
            "config": f"dogbench run --config FILE --out {self.path} --force",
            "tuning": f"dogbench tune --out {self.path}",
            "head": f"dogbench evaluate {self.path}",
            "finetune": f"dogbench finetune --out {self.path}",
            "predictions": f"dogbench evaluate {self.path}",
            "results": f"dogbench evaluate {self.path}",
            "explanations": f"rm -r {self.explanations_dir} && dogbench report {self.path}",
        }
        return commands[what]

    @contextmanager
    def reading(self, path: Path, what: str) -> Iterator[None]:
        """Turn whatever reading ``path`` raises into one RunFolderError naming it and its rebuild command."""
        try:
            yield
        except RunFolderError:
            raise
        except FileNotFoundError:
            raise RunFolderError(f"{path} is missing; rebuild it with `{self.rebuild(what)}`") from None
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, zipfile.BadZipFile,
                DogbenchError) as err:
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RunFolderError(
                f"{path} is corrupt or from another dogbench ({type(err).__name__}: {detail}); rebuild it with "
                f"`{self.rebuild(what)}`"
            ) from None

    def _read_json(self, path: Path, what: str, parse: Callable[[Any], T]) -> T:
        with self.reading(path, what):
            return parse(json.loads(path.read_text()))

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive writing into this folder (a second process on it waits, then resumes from what is there)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with locked(self.path / ".lock", what=f"the run folder {self.path}"):
            yield

    # ------------------------------------------------------------ config
    def read_config(self) -> RunConfig:
        if not self.path.is_dir():
            raise RunFolderError(f"Run folder {self.path} does not exist: give a folder that `dogbench run` wrote")
        if not self.config_path.is_file():
            raise RunFolderError(f"{self.config_path} is missing: {self.path} is not a dogbench run folder (its "
                                 f"config is written by `dogbench run` or `dogbench tune`; to give it one: "
                                 f"`{self.rebuild('config')}`)")
        return self._read_json(self.config_path, "config", lambda d: from_mapping(saved_to_doc(d)))

    def write_config(self, cfg: RunConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        cfg.save(self.config_path)

    def check_config(self, given: RunConfig, *, force: bool = False) -> None:
        """Refuse a ``given`` config that computes something else than this folder's own (differences named),
        unless ``force``; differences in how a run executes (device, cache, batch size, report...) are fine."""
        if not self.exists() or force:
            return
        differences = config_differences(self.read_config(), _with_out(given, self.path))
        if differences:
            shown = "\n  ".join(differences[:20])
            more = f"\n  ... and {len(differences) - 20} more" if len(differences) > 20 else ""
            raise RunFolderError(
                f"{self.path} was made with another config; its {CONFIG_FILE} is the source of truth for every "
                f"stage. Differences (saved -> given):\n  {shown}{more}\nStart a new run folder (--out NEW), "
                "give no config or flags to use the saved one, or pass --force to replace it (stages whose "
                "inputs changed are then computed again)."
            )

    def settle_config(self, given: RunConfig, *, force: bool = False) -> RunConfig:
        """The config a stage works with, written to the folder: ``given`` once ``check_config`` accepts it (the
        saved one when the caller built ``given`` from it, as the CLI does when no config is given)."""
        self.check_config(given, force=force)
        given = _with_out(given, self.path)
        self.write_config(given)
        return given

    # ------------------------------------------------------------ results
    def read_results(self) -> RunResults:
        if not self.path.is_dir():
            raise RunFolderError(f"Run folder {self.path} does not exist: give a folder that `dogbench run` wrote")
        if not self.results_path.is_file():
            raise RunFolderError(f"{self.results_path} is missing: the run's evaluation has not finished; run "
                                 f"`{self.rebuild('results')}`")
        return self._read_json(self.results_path, "results", RunResults.from_dict)

    def write_results(self, results: RunResults) -> None:
        """results.json, results.csv (one row per model and method) and summary.txt (the printed table)."""
        atomic_write_json(self.results_path, results.to_dict())
        atomic_write_text(self.path / RESULTS_CSV, results.to_csv())
        atomic_write_text(self.path / SUMMARY_FILE, results.summary_table() + "\n")

    # ------------------------------------------------------------ tuning
    def read_tuning(self, label: str, parse: Callable[[Any], T]) -> T | None:
        """``<label>/tuning.json`` parsed by ``parse`` (e.g. ``Tuning.from_dict``), or None when there is none."""
        path = self.tuning_path(label)
        if not path.is_file():
            return None
        return self._read_json(path, "tuning", parse)

    def write_tuning(self, label: str, doc: Mapping[str, Any]) -> None:
        atomic_write_json(self.tuning_path(label), dict(doc))

    # ------------------------------------------------------------ predictions
    def write_predictions(self, label: str, p: Predictions) -> None:
        p.check()
        atomic_write_with(self.predictions_path(label), lambda h: np.savez_compressed(
            h, sample_ids=np.asarray(p.sample_ids), y_true=p.y_true, proba=p.proba.astype(np.float32),
            confusion=p.confusion, paths=np.asarray(p.paths), boxes=p.boxes, classes=np.asarray(p.classes),
            **({} if p.proba_uncalibrated is None else {"proba_uncalibrated": p.proba_uncalibrated.astype(np.float32)}),
        ))

    def read_predictions(self, label: str) -> Predictions:
        path = self.predictions_path(label)
        with self.reading(path, "predictions"), open(path, "rb") as handle, np.load(handle, allow_pickle=False) as npz:
            missing = sorted(set(PREDICTION_ARRAYS) - set(npz.files) - {"boxes", "confusion"})
            if missing:
                raise ValueError(f"it lacks {missing}")
            n = len(npz["sample_ids"])
            p = Predictions(
                sample_ids=npz["sample_ids"].astype(str), y_true=npz["y_true"].astype(np.int64), proba=npz["proba"],
                confusion=npz["confusion"] if "confusion" in npz.files else np.zeros((0, 0), np.int64),
                paths=npz["paths"].astype(str),
                boxes=npz["boxes"] if "boxes" in npz.files else np.full((n, 4), -1, dtype=np.int64),
                classes=tuple(npz["classes"].astype(str).tolist()),
                proba_uncalibrated=npz["proba_uncalibrated"] if "proba_uncalibrated" in npz.files else None,
            )
            p.check()
        return p

    # ------------------------------------------------------------ explanations
    def read_explanations(self) -> list[dict[str, Any]]:
        """The report's explanation records (``explanations/explanations.json``); [] when there are none."""
        path = self.explanations_dir / EXPLANATIONS_FILE
        if not path.is_file():
            return []

        def records(d: Any) -> list[dict[str, Any]]:
            if not isinstance(d, list) or not all(isinstance(r, dict) for r in d):
                raise TypeError("expected a list of records")
            return d

        return self._read_json(path, "explanations", records)


def _with_out(cfg: RunConfig, path: Path) -> RunConfig:
    return dataclasses.replace(cfg, out=str(path))


def new_run_dir(base: str | Path = "runs") -> RunDir:
    """A fresh ``base/<timestamp>`` folder, created atomically (two runs started in the same second get
    ``<timestamp>`` and ``<timestamp>-2``)."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        path = base / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return RunDir(path)
    raise RunFolderError(f"Could not create a new run folder under {base}")
