"""The result records of a run and their files: the contract between evaluation and reporting.

``results.json`` (schema in docs/guide/run-folder.md), ``results.csv`` (one row per model and method) and the printed
summary table all come from ``RunResults``; rundir.RunDir writes them. No torch import here.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from dogbench.names import ModelName, model_name

RESULTS_SCHEMA_VERSION = 3  # 3: fine-tuned rows (method, training); 2: calibration, extra_test, seeds, data_efficiency
READABLE_SCHEMAS = (1, 2, RESULTS_SCHEMA_VERSION)
SKIPPED_SHOWN = 10  # unreadable files named in the printed summary


@dataclass
class StageTimes:
    """Wall-clock and process CPU seconds (this process and its finished workers) per stage."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        wall0, cpu0 = time.perf_counter(), _cpu_seconds()
        try:
            yield
        finally:
            self.wall[stage] = self.wall.get(stage, 0.0) + time.perf_counter() - wall0
            self.cpu[stage] = self.cpu.get(stage, 0.0) + _cpu_seconds() - cpu0


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass(frozen=True)
class ModelResult:
    label: str
    backbone: str  # timm tag
    weights: str  # "hub", "random" or a file path
    weights_sha256: str
    feature_dim: int
    params: int
    gflops: float  # per image at the input size
    preprocess: dict[str, Any]
    feature_key: str
    cache_hit: bool
    device: str
    precision: str
    head: dict[str, Any]  # {"kind", "params", "epochs", "study"...}
    val: dict[str, float]  # {"top1"}: best trial's validation top-1
    test: dict[str, Any]  # {"top1", "top1_ci95", "top5", "macro_f1", "per_class", "n"}
    baseline: dict[str, Any]  # {"C", "val": {"top1"}, "test": {"top1", "top1_ci95"}} or {}
    timing_s: dict[str, float]  # extract, tune, baseline, fit, evaluate (wall)
    cpu_s: dict[str, float]
    throughput_img_s: float | None  # images per second through the model in extraction (None on a cache hit)
    pretraining: str = ""  # what the weights were trained on, from the timm tag (backbones.pretraining_of)
    leaky: bool = False  # pretrained on ImageNet-family data while the dataset is Stanford Dogs (an ImageNet subset)
    architecture: dict[str, Any] = field(default_factory=dict)  # architecture.Architecture.to_dict()
    # temperature, bins, val/test {before, after} {ece, nll, brier}, reliability {before, after} (evaluate)
    calibration: dict[str, Any] = field(default_factory=dict)
    # per second test set: {top1, top1_ci95, top5, macro_f1, per_class, n, calibration, skipped, baseline}
    extra_test: dict[str, Any] = field(default_factory=dict)
    method: str = "frozen"  # frozen (a tuned head on cached features) or a fine-tuning method (config.METHODS)
    # fine-tuned rows: trainable_params, train_wall_s, train_cpu_s, train_img_s, peak_memory_mb, epochs_run,
    # best_epoch, history, params (the recipe as resolved), trials, base (the frozen row it was compared with)
    training: dict[str, Any] = field(default_factory=dict)
    description: str | None = None  # the config's words for the weights (names.model_name reads it)
    # evaluate.tta other than none: views, n_views, single_view (the plain view's test scores), comparison (paired,
    # with against without the views); ``test`` holds the scores with them. Empty, and left out of the JSON, without
    tta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    root: str
    layout: str
    split_source: str
    n_train: int
    n_val: int
    n_test: int
    n_classes: int
    skipped: int
    skipped_files: list[dict[str, str]]  # [{"id", "reason"}]
    test_set: str = ""  # sha256 of the test images' bytes and labels: its key in the test-set ledger


@dataclass(frozen=True)
class RunResults:
    models: dict[str, ModelResult]
    comparison: dict[str, Any] | None  # the two backbones; with more, the best by validation vs the runner-up
    comparisons: list[dict[str, Any]]  # every pair, in config order
    dataset: DatasetInfo
    environment: dict[str, Any]
    config: dict[str, Any]
    timing_s: dict[str, float]  # whole-run stages: data, features, tune, evaluate, total
    extra_test: dict[str, Any] = field(default_factory=dict)  # set -> {root, n, skipped, comparisons}
    data_efficiency: dict[str, Any] = field(default_factory=dict)  # protocols.efficiency.data_efficiency
    seeds: dict[str, Any] = field(default_factory=dict)  # protocols.seeds.repeat_over_seeds (evaluate.seeds > 1)
    # three or more models: the best by validation against each other on test, Holm-corrected (protocols.scoring)
    best_vs_rest: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    schema_version: int = RESULTS_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for row in out["models"].values():  # a run without test-time augmentation writes what it always wrote
            if not row["tta"]:
                del row["tta"]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResults:
        """``results.json`` back into records; KeyError/TypeError/ValueError when it does not fit the schema."""
        if not isinstance(d, dict):
            raise TypeError(f"expected a JSON object, got {type(d).__name__}")
        if d.get("schema_version") not in READABLE_SCHEMAS:
            raise ValueError(f"schema_version {d.get('schema_version')!r}, expected one of {READABLE_SCHEMAS}")
        models = {label: ModelResult(**m) for label, m in d["models"].items()}
        return cls(**{**d, "models": models, "dataset": DatasetInfo(**d["dataset"])})

    def names(self) -> dict[str, ModelName]:
        """Each model's ``names.ModelName``, by label."""
        return {label: model_name(asdict(m)) for label, m in self.models.items()}

    def csv_rows(self) -> list[dict[str, Any]]:
        rows = []
        for m in self.models.values():
            common = {
                "label": m.label, "backbone": m.backbone, "weights": m.weights, "feature_dim": m.feature_dim,
                "params": m.params, "gflops": round(m.gflops, 4), "extract_s": round(m.timing_s.get("extract", 0), 3),
                "throughput_img_s": round(m.throughput_img_s, 2) if m.throughput_img_s else "",
                "device": m.device,
            }
            method = (f"tuned {m.head.get('kind', '')} head" if m.method == "frozen" else
                      f"{m.method} fine-tuning ({m.training.get('trainable_params', 0) / 1e6:.2f}M trained)")
            rows.append({
                **common, "method": method, "val_top1": m.val["top1"],
                "test_top1": m.test["top1"], "test_top1_ci_lo": m.test["top1_ci95"][0],
                "test_top1_ci_hi": m.test["top1_ci95"][1], "test_top5": m.test["top5"],
                "test_macro_f1": m.test["macro_f1"], "test_balanced_top1": m.test.get("balanced_top1", ""),
                "fit_s": round(m.timing_s.get("tune", 0) + m.timing_s.get("fit", 0) + m.timing_s.get("train", 0), 3),
            })
            if m.baseline:
                rows.append({
                    **common, "method": "logistic regression (C swept)", "val_top1": m.baseline["val"]["top1"],
                    "test_top1": m.baseline["test"]["top1"], "test_top1_ci_lo": m.baseline["test"]["top1_ci95"][0],
                    "test_top1_ci_hi": m.baseline["test"]["top1_ci95"][1], "test_top5": m.baseline["test"]["top5"],
                    "test_macro_f1": m.baseline["test"]["macro_f1"],
                    "test_balanced_top1": m.baseline["test"].get("balanced_top1", ""),
                    "fit_s": round(m.timing_s.get("baseline", 0), 3),
                })
        return rows

    def tta_lines(self) -> list[str]:
        """Each row scored with test-time augmentation: its single-view top-1 and the paired verdict."""
        return [f"{m.label} with {m.tta['views']} test-time augmentation ({m.tta['n_views']} views; the table's test "
                f"columns): single view test top-1 {m.tta['single_view']['top1']:.4f}; " + verdict(m.tta["comparison"])
                for m in self.models.values() if m.tta]

    def to_csv(self) -> str:
        rows = self.csv_rows()
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["label"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()

    def summary_table(self) -> str:
        header = ["model", "method", "val top1", "test top1 [95% CI]", "top5", "macro-F1", "bal. top1", "params",
                  "GFLOPs", "extract s", "tune+fit s", "img/s"]
        rows = [
            [
                r["label"], r["method"], f"{r['val_top1']:.4f}",
                f"{r['test_top1']:.4f} [{r['test_top1_ci_lo']:.4f}, {r['test_top1_ci_hi']:.4f}]",
                f"{r['test_top5']:.4f}", f"{r['test_macro_f1']:.4f}",
                f"{r['test_balanced_top1']:.4f}" if r["test_balanced_top1"] != "" else "-", f"{r['params'] / 1e6:.1f}M",
                f"{r['gflops']:.2f}", f"{r['extract_s']:.1f}", f"{r['fit_s']:.1f}",
                f"{r['throughput_img_s']:.1f}" if r["throughput_img_s"] != "" else "cached",
            ]
            for r in self.csv_rows()
        ]
        table = text_table(header, rows)
        line = table[1]
        lines = [
            f"dogbench: {self.dataset.name} ({self.dataset.n_train} train / {self.dataset.n_val} val / "
            f"{self.dataset.n_test} test, {self.dataset.n_classes} classes, {self.dataset.skipped} skipped)",
            *table,
        ]
        if self.best_vs_rest:
            lines += [line, *verdicts_many(self.best_vs_rest, self.names())]
        elif self.comparison:
            lines += [line, verdict(self.comparison, self.names())]
        if note := selection_note(self.config):
            lines.append(note)
        lines += self.tta_lines()
        for name, info in self.extra_test.items():
            scored = ", ".join(
                f"{m.label} {m.extra_test[name]['top1']:.4f} [{m.extra_test[name]['top1_ci95'][0]:.4f}, "
                f"{m.extra_test[name]['top1_ci95'][1]:.4f}]" for m in self.models.values() if name in m.extra_test)
            lines.append(f"second test set {name} ({info['n']} images, {info['skipped']} skipped): test top-1 {scored}")
            if info["comparisons"]:
                lines.append(f"  on {name}: {verdict(info['comparisons'][0], self.names())}")
        if self.seeds.get("n", 1) > 1:
            per_model = ", ".join(f"{label} {t['tuned']['mean']:.4f}+-{t['tuned']['std']:.4f}"
                                  for label, t in self.seeds["models"].items())
            lines.append(f"over {self.seeds['n']} seeds (split, search, refit): test top-1 mean +- sd {per_model}")
            for c in self.seeds["comparisons"]:
                d = c["delta"]
                lines.append(f"  {c['a']} - {c['b']}: {d['mean'] * 100:+.2f} +- {d['std'] * 100:.2f} points "
                             f"(range {d['min'] * 100:+.2f} .. {d['max'] * 100:+.2f}; {c['a']} better in "
                             f"{c['a_better_in']} of {self.seeds['n']} seeds)")
        curves = self.data_efficiency
        if curves.get("shots"):
            lines.append(f"data efficiency: test top-1 with k training images per class, mean +- sd over "
                         f"{curves['seeds']} seeds (tuned head with {curves['trials']} trials / baseline)")
            for label, per_k in curves["models"].items():
                lines.append(f"  {label}: " + "  ".join(
                    f"k={k} {p['tuned']['mean']:.3f}+-{p['tuned']['std']:.3f}"
                    + (f" / {p['baseline']['mean']:.3f}" if "baseline" in p else "") for k, p in per_k.items()))
        shown = self.dataset.skipped_files[:SKIPPED_SHOWN]
        lines += [f"skipped {f['id']}: {f['reason']}" for f in shown]
        if self.dataset.skipped > len(shown):
            lines.append(f"... and {self.dataset.skipped - len(shown)} more skipped (results.json lists them all)")
        lines.append(f"total {self.timing_s.get('total', 0):.1f} s")
        return "\n".join(lines)


def text_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """Columns padded to their widest cell, a rule of dashes under the header: the printed tables' layout."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    return ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), "  ".join("-" * w for w in widths),
            *("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) for row in rows)]


def board_metric(rows: list[Mapping[str, Any]]) -> str:
    """The ``tune.metric`` a screen's leaderboard rows were ranked by (``top1`` where no candidate was scored)."""
    return next((r["cv"]["metric"] for r in rows if r["cv"]), "top1")


def p_value(p: float) -> str:
    """An exact McNemar p as a reader takes it: ``p = 0.0312``, or ``p < 1e-100`` beyond double precision's use."""
    return "p < 1e-100" if p < 1e-100 else f"p = {p:.3g}"


def selection_note(config: Mapping[str, Any]) -> str | None:
    """What chose the heads and how classes were balanced, when not the defaults (top-1, none); None otherwise."""
    metric = config.get("tune", {}).get("metric", "top1")
    balance = config.get("data", {}).get("balance", "none")
    if metric == "top1" and balance == "none":
        return None
    return (f"heads, trials and fine-tuning epochs chosen on validation {metric.replace('_', ' ')} (tune.metric; "
            f"'val top1' holds it), classes balanced by {balance} (data.balance, frozen and fine-tuned rows alike); "
            "the paired tests still compare per-image correctness on test (top-1).")


def verdict(comparison: dict[str, Any], names: Mapping[str, ModelName] | None = None) -> str:
    """One sentence: who is better on test top-1, by how much, and whether the difference is significant.

    With ``names`` (label -> ``names.ModelName``) each model is named as a reader knows it, its label in brackets,
    "EfficientNet-Lite0 pretrained on ImageNet-1k (cnn)", so tables can go on using the labels.
    """
    a, b, delta = comparison["a"], comparison["b"], comparison["delta_top1"]
    lo, hi = comparison["delta_top1_ci95"]
    p = comparison["mcnemar_p"]
    significant = p < 0.05 and (lo > 0 or hi < 0)
    named = {k: names[k].in_sentence if names and k in names else k for k in (a, b)}
    if delta == 0:
        return f"{named[a]} and {named[b]} have the same test top-1 (McNemar {p_value(p)})."
    better, worse, (lo, hi) = (a, b, (lo, hi)) if delta > 0 else (b, a, (-hi, -lo))
    strength = "significantly" if significant else "but not significantly at 5%"
    return (f"{named[better]} beats {named[worse]} by {abs(delta) * 100:.2f} points of test top-1, {strength}: "
            f"paired bootstrap 95% CI of {better} - {worse} [{lo * 100:+.2f}, {hi * 100:+.2f}] points, "
            f"exact McNemar {p_value(p)}, n = {comparison['n']} test images.")


def verdicts_many(best_vs_rest: dict[str, Any], names: Mapping[str, ModelName] | None = None) -> list[str]:
    """The verdict of three or more models: the best by validation, then each of its paired comparisons on test
    with its Holm-corrected p, and which differences survive the correction."""
    best, pairs = best_vs_rest["best"], best_vs_rest["comparisons"]
    named = names[best].in_sentence if names and best in names else best
    lines = [f"{named} is the best of {len(pairs) + 1} models on {best_vs_rest['chosen_by'].replace('_', ' ')}; "
             f"on test, paired against each other model (exact McNemar, Holm-corrected over {len(pairs)} "
             "comparisons):"]
    for c in pairs:
        lo, hi = c["delta_top1_ci95"]
        lines.append(f"  vs {c['b']}: {c['delta_top1'] * 100:+.2f} points [{lo * 100:+.2f}, {hi * 100:+.2f}], "
                     f"Holm {p_value(c['p_holm'])}: " + ("significant" if c["survives"] else "not significant at "
                                                       f"{best_vs_rest['alpha']:.0%}"))
    better = [c["b"] for c in pairs if c["survives"] and c["delta_top1"] > 0]
    worse = [c["b"] for c in pairs if c["survives"] and c["delta_top1"] < 0]
    apart = [c["b"] for c in pairs if not c["survives"] or c["delta_top1"] == 0]
    said = [f"{best} is significantly better than {', '.join(better) or 'none of them'}"]
    if worse:
        said.append(f"significantly worse on test than {', '.join(worse)}, although chosen by validation")
    if apart:
        said.append(f"it cannot be told apart from {', '.join(apart)} on these test images")
    lines.append("; ".join(said) + ".")
    return lines


def verdict_of_many(best_vs_rest: dict[str, Any], names: Mapping[str, ModelName] | None = None) -> str:
    """``verdicts_many`` as one paragraph (the report's headline)."""
    first, *pairs, last = verdicts_many(best_vs_rest, names)
    return f"{first} {'; '.join(p.strip() for p in pairs)}. {last}"
