"""Trackers that observe a run: TensorBoard event files (the default) and MLflow (``[track]``).

A command opens a ``session`` on rank 0; the training loop, the study runner and the pipeline's end report to
``active()``, which is a no-op outside a session. docs/guide/tracking.md says what each tracker shows.
"""

from dogbench.track.base import Finals, Tracker, Trackers, TrackingWarning, active, tracking
from dogbench.track.session import config_digest, flat_params, session

__all__ = ["Finals", "Tracker", "Trackers", "TrackingWarning", "active", "config_digest", "flat_params", "session",
           "tracking"]
