"""MLflow, for teams: one parent run per run folder (the resolved config as params, the files as artifacts), a
child run per model row (config + backbone identity as params, the final figures and the chosen training's
curves as metrics, tags version / config digest / leaky) and per training or study (curves as they happen).

Runs are found again by their tags, so a resumed command adds to the same runs and logs nothing twice: params
only into a new run, finals only into a row without them, epochs only after the training's checkpoint.
"""

from __future__ import annotations

import math
import os
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dogbench.track.base import Finals, Tracker

EXPERIMENT = "dogbench"
RUN_DIR_TAG, SERIES_TAG = "dogbench.run_dir", "dogbench.series"
PARENT = ""  # the series of the parent run


def default_uri(run_dir: Path) -> str:
    """``sqlite:///<run folder>/../mlflow.db``: one embedded store beside the runs of a folder."""
    return f"sqlite:///{run_dir.resolve().parent / 'mlflow.db'}"


def _check_reachable(uri: str) -> None:
    """A tracking server answers its health check within seconds (else the error says why)."""
    if uri.startswith(("http://", "https://")):
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=3) as answer:  # noqa: S310 - http(s) only
            answer.read()


class MlflowTracker(Tracker):
    """The runs of ``run_dir`` in the ``dogbench`` experiment at ``uri``."""

    def __init__(self, uri: str, run_dir: Path, *, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        self.name = f"MLflow ({uri})"
        _check_reachable(uri)
        # a server that goes away mid-run costs seconds, not MLflow's default minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_dir, self.params, self.tags = str(run_dir.resolve()), dict(params), dict(tags)
        found = self.client.get_experiment_by_name(EXPERIMENT)
        self.experiment = found.experiment_id if found is not None else self.client.create_experiment(
            EXPERIMENT, artifact_location=(run_dir.resolve().parent / "mlartifacts").as_uri()
            if uri.startswith("sqlite:") else None)
        self.runs: dict[str, str] = {}
        self.parent = self.run_id(PARENT)
        self.client.update_run(self.parent, status="RUNNING")

    def run_id(self, series: str) -> str:
        """The MLflow run of ``series`` ("" = the parent), found by its tags or created with the params."""
        if series in self.runs:
            return self.runs[series]
        query = f"tags.`{RUN_DIR_TAG}` = '{_quote(self.run_dir)}' and tags.`{SERIES_TAG}` = '{_quote(series)}'"
        found = self.client.search_runs([self.experiment], filter_string=query, max_results=1)
        if found:
            self.runs[series] = found[0].info.run_id
            return self.runs[series]
        tags = {**self.tags, RUN_DIR_TAG: self.run_dir, SERIES_TAG: series}
        if series != PARENT:
            tags["mlflow.parentRunId"] = self.parent
        run = self.client.create_run(self.experiment, run_name=series or Path(self.run_dir).name, tags=tags)
        self.runs[series] = run.info.run_id
        if series == PARENT:
            self._log_params(run.info.run_id, self.params)
        return run.info.run_id

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[i : i + 100])

    def _log_metrics(self, run_id: str, values: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items() if _finite(v)]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)

    def epoch(self, series: str, entry: Mapping[str, Any]) -> None:
        self._log_metrics(self.run_id(series), {f"epoch_{k}": entry[k] for k in ("train_loss", "val_top1", "lr")},
                          int(entry["epoch"]))

    def trial(self, study: str, number: int, params: Mapping[str, Any], value: float | None) -> None:
        numeric = {f"trial_{k}": v for k, v in params.items() if isinstance(v, int | float)}
        self._log_metrics(self.run_id(study), {"objective": value, **numeric} if value is not None else numeric,
                          number)

    def finish(self, finals: Finals) -> None:
        models = finals.results.get("models", {})
        for label, row in models.items():
            self._finish_row(label, row)
        for path in finals.artifacts:
            if path.is_file():
                self.client.log_artifact(self.parent, str(path))
        self.client.set_tag(self.parent, "leaky", str(any(r.get("leaky") for r in models.values())).lower())

    def _finish_row(self, label: str, row: Mapping[str, Any]) -> None:
        """A row's params, tags, final metrics and curves, unless an earlier finish logged them."""
        run_id = self.run_id(label)
        run = self.client.get_run(run_id)
        if not run.data.params:
            identity = {k: row.get(k) for k in ("backbone", "weights", "weights_sha256", "method", "feature_dim")}
            self._log_params(run_id, {**self.params, **{f"model.{k}": v for k, v in identity.items()}})
        self.client.set_tag(run_id, "leaky", str(bool(row.get("leaky"))).lower())
        if "test_top1" not in run.data.metrics:
            self._log_metrics(run_id, final_metrics(row))
            for entry in (row.get("training") or {}).get("history", []):
                self.epoch(label, entry)
        self.client.set_terminated(run_id, "FINISHED")

    def close(self) -> None:
        self.client.set_terminated(self.parent, "FINISHED")


def final_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """A results.json row's numbers: test top-1 with its interval, top-5, macro-F1, validation top-1, and the
    calibration figures before and after temperature scaling (``test_ece_after``)."""
    test, cal = row.get("test", {}), row.get("calibration") or {}
    lo, hi = test.get("top1_ci95", (math.nan, math.nan))
    out = {"test_top1": test.get("top1"), "test_top1_ci95_lo": lo, "test_top1_ci95_hi": hi,
           "test_top5": test.get("top5"), "test_macro_f1": test.get("macro_f1"),
           "val_top1": (row.get("val") or {}).get("top1")}
    for split in ("val", "test"):  # {"before": {"ece": ...}, "after": {...}}: temperature scaling's effect
        for when, figures in (cal.get(split) or {}).items():
            out.update({f"{split}_{key}_{when}": v for key, v in (figures or {}).items()})
    return {k: float(v) for k, v in out.items() if _finite(v)}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")
