"""Every scoring of a test set goes into the ledger in the feature cache (``dogbench.ledger``): the test set's
digest (its images' bytes and labels), each scored model's identity, the configuration's digest, the run folder.
``report`` and ``screen`` then say how often, and by how many configurations, this test set has been looked at."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dogbench.config import RunConfig, computed_items
from dogbench.data import Dataset
from dogbench.data.download import default_cache_dir
from dogbench.ledger import Scoring, read, record, tally
from dogbench.results import RunResults
from dogbench.rundir import RunDir


def ledger_dir(features: Mapping[str, Any]) -> Path:
    """Where the ledger lives: the feature cache of a run's ``features`` settings (a config's dict form)."""
    cache_dir = features.get("cache_dir")
    return Path(cache_dir) if cache_dir else default_cache_dir() / "features"


def test_set_digest(dataset: Dataset) -> str:
    """sha256 of the test split's (image bytes, label) pairs, sorted: the same photos and labels, the same test
    set, whatever layout listed them."""
    test = dataclasses.replace(dataset, samples=dataset.split("test"))
    ids = test.content_ids(with_boxes=False, memo_dir=default_cache_dir() / "content")
    pairs = sorted(f"{c}:{dataset.classes[s.label]}" for c, s in zip(ids, test.samples, strict=True))
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()


def _config_digest(cfg: RunConfig) -> str:
    """The configuration's identity: the keys that change what a run computes (not where it runs or writes)."""
    return hashlib.sha256(json.dumps(computed_items(cfg), sort_keys=True, default=str).encode()).hexdigest()


def record_looks(cfg: RunConfig, run: RunDir, dataset: Dataset, results: RunResults) -> RunResults:
    """One ledger line per model the run scored on test; the test set's digest joins results.json."""
    digest = test_set_digest(dataset)
    config, now = _config_digest(cfg), time.time()
    record(ledger_dir(cfg.to_dict()["features"]), [
        Scoring(digest, f"{m.backbone}|{m.weights_sha256}|{m.method}", config, str(run.path.resolve()),
                results.dataset.n_test, now) for m in results.models.values()])
    results = dataclasses.replace(results, dataset=dataclasses.replace(results.dataset, test_set=digest))
    run.write_results(results)
    return results


def run_looks(results: Mapping[str, Any], run_dir: Path) -> str | None:
    """How often the test set of the run in ``run_dir`` had been scored when the run last scored it, in words
    (None for a run from before the ledger). Later runs are not counted; a ledger that does not hold the run (read
    from another machine or cache) says so."""
    digest = results.get("dataset", {}).get("test_set")
    if not digest:
        return None
    where = ledger_dir(results.get("config", {}).get("features", {}))
    lines = read(where)  # once: the run's own lines and the count come from the same reading
    own = [s.time for s in lines if s.test_set == digest and s.run == str(Path(run_dir).resolve())]
    if not own:
        return (f"The test-set ledger at {where} holds no scoring of this run (made on another machine or with "
                "another feature cache): how often this test set was looked at is unknown here.")
    return tally(lines, digest, until=max(own)).sentence()
