"""The report's headline words beyond the verdict: who each model is, why one wins (sentences with the run's own
numbers, each left out when its evidence is absent) and the caveats, as plain sentences. No torch import.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dogbench.data import STANFORD_DOGS
from dogbench.names import ModelName, model_name
from dogbench.protocols.looks import run_looks
from dogbench.report.runs import ModelRun, RunFolder, aligned
from dogbench.results import selection_note

SAME = 1e-12  # two accuracies this close are the same count of right answers


def model_names(models: list[ModelRun]) -> dict[str, ModelName]:
    """Each model's name as a reader knows it, by its key in the report (``<run>/<label>`` across runs)."""
    return {m.key: dataclasses.replace(model_name(m.result or {"label": m.label}), label=m.key) for m in models}


def title(models: list[ModelRun], names: dict[str, ModelName]) -> str:
    """"EfficientNet-Lite0 vs saliency-tuned DINOv2 ViT-S/14": the distinct backbones, or a count beyond three."""
    titles = list(dict.fromkeys(names[m.key].title for m in models))
    return " vs ".join(titles) if len(titles) <= 3 else f"{len(titles)} backbones compared"


def same_as_probe(result: dict[str, Any]) -> bool:
    """A frozen model whose tuned head is its C-swept logistic-regression probe: a logistic head with the
    probe's C, no label smoothing, and the same test top-1."""
    base = result.get("baseline") or {}
    params = (result.get("head") or {}).get("params") or {}
    return (result.get("method", "frozen") == "frozen" and bool(base) and params.get("head") == "logistic"
            and params.get("C") == base.get("C") and not params.get("label_smoothing")
            and abs(result["test"]["top1"] - base["test"]["top1"]) < SAME)


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def _probe(a: ModelRun, b: ModelRun) -> str | None:
    ba, bb = a.result.get("baseline") or {}, b.result.get("baseline") or {}
    if not ba or not bb:
        return None
    head_order = np.sign(a.result["test"]["top1"] - b.result["test"]["top1"])
    probe_order = np.sign(ba["test"]["top1"] - bb["test"]["top1"])
    words = ("The same order holds without the head search" if head_order == probe_order else
             "Without the head search the order changes")
    return (f"{words}: a logistic-regression probe on the same frozen features scores {a.key} "
            f"{_pct(ba['test']['top1'])} and {b.key} {_pct(bb['test']['top1'])}"
            + (", so the gap lies in the features, not in the heads." if head_order == probe_order else "."))


def _breeds(a: ModelRun, b: ModelRun) -> str | None:
    ia, ib = aligned(a, b)
    if a.classes != b.classes or not len(ia):
        return None
    n = len(a.classes)
    recalls = []
    for m, rows in ((a, ia), (b, ib)):
        support = np.bincount(m.y_true[rows], minlength=n)
        hits = np.bincount(m.y_true[rows][m.correct[rows]], minlength=n)
        recalls.append(np.where(support > 0, hits / np.maximum(support, 1), np.nan))
    keep = np.isfinite(recalls[0]) & np.isfinite(recalls[1])
    diff = recalls[0][keep] - recalls[1][keep]
    ahead_a, ahead_b = int((diff > 0).sum()), int((diff < 0).sum())
    return (f"Per breed, {a.key} is ahead on {ahead_a} of {int(keep.sum())} breeds and {b.key} on {ahead_b} "
            f"({int(keep.sum()) - ahead_a - ahead_b} tied).")


def _top5(a: ModelRun, b: ModelRun) -> str | None:
    weaker = min((a, b), key=lambda m: m.result["test"]["top1"])
    t1, t5 = weaker.result["test"]["top1"], weaker.result["test"].get("top5")
    if t5 is None or t5 - t1 < 0.2:
        return None
    return (f"{weaker.key}'s first guess is right on {_pct(t1)} of the test images, but the right breed is among "
            f"its five best guesses on {_pct(t5)}.")


def _calibration(a: ModelRun, b: ModelRun) -> str | None:
    cals = [(m.key, (m.result.get("calibration") or {}).get("test")) for m in (a, b)]
    if not all(c for _, c in cals):
        return None
    moves = " and ".join(f"{k}'s from {c['before']['ece']:.3f} to {c['after']['ece']:.3f}" for k, c in cals)
    return (f"Temperature scaling moves the test calibration error (ECE) {moves}; it changes no prediction, so "
            "calibration does not explain the gap.")


def _efficiency(run: RunFolder, a: ModelRun, b: ModelRun) -> str | None:
    curves = (run.results.get("data_efficiency") or {}).get("models") or {}
    if a.label not in curves or b.label not in curves:
        return None
    shots = [k for k in curves[a.label] if k in curves[b.label]]
    if not shots:
        return None
    said = [f"with {k} training image{'s' if int(k) != 1 else ''} per breed, {a.key} reaches "
            f"{_pct(curves[a.label][k]['tuned']['mean'])} and {b.key} {_pct(curves[b.label][k]['tuned']['mean'])}"
            for k in dict.fromkeys((shots[0], shots[-1]))]
    return "On the data-efficiency curve, " + "; ".join(said) + "."


def _seeds(run: RunFolder, a: ModelRun, b: ModelRun) -> str | None:
    seeds = run.results.get("seeds") or {}
    for c in seeds.get("comparisons") or []:
        if {c["a"], c["b"]} == {a.label, b.label}:
            ahead = c["a_better_in"] if c["a"] == a.label else c["b_better_in"]
            return f"Over {seeds['n']} seeds of split, search and refit, {a.key} is ahead in {ahead}."
    return None


def _described(models: tuple[ModelRun, ModelRun]) -> str | None:
    said = [f"{m.key}'s weights are a local file that the config describes as \u201c{m.result['description']}\u201d"
            for m in models if m.result.get("description") and m.result.get("weights") not in ("hub", "random")]
    if not said:
        return None
    return "; ".join(said) + ": the verdict is about these weights, not about CNNs or ViTs in general."


def why(run: RunFolder) -> list[str]:
    """Why the run's headline comparison came out as it did, from the run's own evidence, winner first."""
    c = run.results.get("comparison")
    if not c or c["a"] not in run.models or c["b"] not in run.models:
        return []
    a, b = run.models[c["a"]], run.models[c["b"]]
    if c["delta_top1"] < 0:
        a, b = b, a
    sentences = (_probe(a, b), _breeds(a, b), _top5(a, b), _calibration(a, b), _efficiency(run, a, b),
                 _seeds(run, a, b), _described((a, b)))
    return [s for s in sentences if s]


def _pretrained_on(label: str, result: dict[str, Any]) -> str:
    """``saliency-tuned DINOv2 ViT-S/14 (vit) on LVD-142M, curated around ImageNet-1k/22k``: no nested brackets."""
    name = model_name(result)
    detail = name.pretraining_detail.replace(" (", ", ").replace(")", "").replace(";", ",")
    return f"{name.title} ({label}) on {detail or 'ImageNet-family data'}"


def _leaky(run: RunFolder) -> list[str]:
    leaky = [(k, m) for k, m in run.results["models"].items() if m.get("leaky")]
    if not leaky:
        return []
    which = "both models" if len(leaky) == 2 == len(run.results["models"]) else \
        ("the model" if len(leaky) == 1 else "these models")
    dataset = run.results.get("dataset", {}).get("name", "")
    overlap = ("Stanford Dogs is a subset of ImageNet" if dataset == "stanford-dogs" else
               f"{dataset or 'This dataset'}'s photos may be among ImageNet-family photos")
    out = [f"{overlap}, and {which} {'was' if len(leaky) == 1 else 'were'} pretrained "
           f"on ImageNet-family data: {'; '.join(_pretrained_on(k, m) for k, m in leaky)}.",
           "Some test photos may have been seen in pretraining, so these accuracies may be optimistic; results.json "
           "flags such models as leaky. The comparison between equally exposed models is still fair."]
    if any(m.get("weights") not in ("hub", "random") for _, m in leaky):
        out.append("For weights from a local file, the pretraining data is read from the timm tag, not checked.")
    return [" ".join(out)]


def caveats(runs: list[RunFolder]) -> list[str]:
    """What the figures cannot tell, as plain sentences: ImageNet overlap, random weights, unofficial splits, how
    often the test set has been scored (the ledger)."""
    out = []
    for run in runs:
        prefix = f"{run.name}: " if len(runs) > 1 else ""
        out += [prefix + s for s in _leaky(run)]
        random = [k for k, m in run.results["models"].items() if m.get("weights") == "random"]
        if random:
            out.append(f"{prefix}{', '.join(random)} use randomly initialised weights: a smoke test, not a finding.")
        ds = run.results["dataset"]
        if ds.get("name") == STANFORD_DOGS and ds.get("split_source") != "official-lists":
            out.append(f"{prefix}Stanford Dogs without its official lists: the train/test split was drawn with a seed "
                       f"({ds.get('split_source')}), so the figures are not comparable with published ones.")
        if ds.get("skipped"):
            out.append(f"{prefix}{ds['skipped']} unreadable images were skipped (listed in results.json).")
        note = selection_note(run.results.get("config", {}))
        if note:
            out.append(f"{prefix}{note[0].upper()}{note[1:]}")
        seen = run_looks(run.results, run.path)
        if seen is not None:
            out.append(prefix + seen)
    return out


__all__ = ["caveats", "model_names", "same_as_probe", "title", "why"]
