"""The trackers a command's ``[track]`` section asks for, opened for one run folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from dogbench.config import RunConfig, TrackTo
from dogbench.track.base import Tracker, Trackers, tracking

TENSORBOARD_DIR = "tensorboard"  # RUN/tensorboard/


def flat_params(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"tune.trials": 20, "backbones.0.model": "vit_s16", ...}``."""
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list | tuple) and any(isinstance(v, Mapping) for v in value):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, inner in items:
        out.update(flat_params(inner, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_digest(cfg: RunConfig) -> str:
    """The resolved config's SHA-256 (its first 16 hex digits), a tag that groups the runs of one config."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _version() -> str:
    try:
        return version("dogbench")
    except PackageNotFoundError:
        return "unknown"


def _open(kind: TrackTo, cfg: RunConfig, run_dir: Path) -> Tracker:
    if kind is TrackTo.TENSORBOARD:
        from dogbench.track.tensorboard_log import TensorBoardTracker

        return TensorBoardTracker(run_dir / TENSORBOARD_DIR)
    from dogbench.track.mlflow_log import MlflowTracker, default_uri

    tags = {"dogbench.version": _version(), "dogbench.config_digest": config_digest(cfg)}
    return MlflowTracker(cfg.track.mlflow_uri or default_uri(run_dir), run_dir, params=flat_params(cfg.to_dict()),
                         tags=tags)


def _where(kind: TrackTo, cfg: RunConfig, run_dir: Path) -> str:
    """How the warnings name a tracker that could not open."""
    if kind is TrackTo.TENSORBOARD:
        return f"TensorBoard ({run_dir / TENSORBOARD_DIR})"
    from dogbench.track.mlflow_log import default_uri

    return f"MLflow ({cfg.track.mlflow_uri or default_uri(run_dir)})"


@contextlib.contextmanager
def session(cfg: RunConfig, run_dir: Path) -> Iterator[Trackers]:
    """The trackers of ``cfg.track`` for ``run_dir``, active for the block (rank 0 only: the pipeline's ranks
    that follow never open one). A tracker that cannot open is one warning; the block runs without it."""
    trackers = Trackers([], run_dir)
    for kind in cfg.track.to:
        try:
            trackers.live.append(_open(kind, cfg, run_dir))
        except Exception as err:  # noqa: BLE001 - a missing package or an unreachable server never stops a run
            trackers.failed(_where(kind, cfg, run_dir), err)
    with tracking(trackers):
        yield trackers
