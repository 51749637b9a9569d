"""The sections of the studies a run may add to its test scores: the fine-tuning ladder, the Optuna head search,
repetitions over seeds, second test sets and data efficiency. No torch import.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dogbench.report import plots
from dogbench.report.document import Assets, Cell, Figure, Section, Table
from dogbench.report.runs import ModelRun, RunFolder
from dogbench.report.sections import interval, pct, stage_seconds
from dogbench.results import verdict


def ladder_section(models: list[ModelRun], comps: list[dict[str, Any]], assets: Assets) -> Section | None:
    """Frozen, parameter-efficient and full fine-tuning per backbone: accuracy with intervals against training
    cost, and each method's paired test against the frozen head of its backbone."""
    tuned = [m for m in models if m.result.get("method", "frozen") != "frozen"]
    if not tuned:
        return None
    paired = {(c["a"], c["b"]): c for c in comps}
    rungs: dict[str, list[tuple[str, float, tuple[float, float], float]]] = {}
    rows: list[list[Cell]] = []
    prefix = {m.key: m.key[: -len(m.label)] for m in models}  # "<run>/" when several runs are combined
    for m in models:
        r = m.result
        method = r.get("method", "frozen")
        base_key = m.key if method == "frozen" else prefix[m.key] + r["training"]["base"]
        if method == "frozen" and not any(prefix[t.key] + t.result["training"]["base"] == m.key for t in tuned):
            continue
        t = r.get("training") or {}
        cost = stage_seconds(r) if method == "frozen" else float(t.get("search_wall_s") or t.get("train_wall_s", 0.0))
        rungs.setdefault(base_key, []).append((method, r["test"]["top1"], tuple(r["test"]["top1_ci95"]), cost))
        c = paired.get((m.key, base_key))
        delta = (f"{c['delta_top1'] * 100:+.2f} [{c['delta_top1_ci95'][0] * 100:+.2f}, "
                 f"{c['delta_top1_ci95'][1] * 100:+.2f}], p = {c['mcnemar_p']:.3g}") if c else "-"
        params = (f"{t['trainable_params'] / 1e6:.3f}M ({t['trainable_params'] / t['total_params']:.1%})" if t else
                  f"the {r['head'].get('kind', '?')} head on cached features")
        rows.append([base_key, method, params, f"{pct(r['test']['top1'])} {interval(r['test']['top1_ci95'])}", delta,
                     f"{cost:.0f}", f"{t['train_img_s']:.1f}" if t else "-",
                     f"{t['peak_memory_mb']:.0f}" if t else "-", f"{t['best_epoch']}/{t['epochs_run']}" if t else "-"])
    png = plots.png(plots.ladder(rungs))
    return Section("ladder", "Fine-tuning ladder", [
        "How much does fine-tuning add, and at what cost? Every method trained on the same training split, chose "
        "its best epoch (and its recipe, with finetune.trials) on the same validation split, and was scored once on "
        "the same test images through the same inference path as the frozen head; differences are paired "
        "(bootstrap interval and exact McNemar p against the frozen head of the same backbone). Training cost is "
        "wall time on the machine that ran it (a fine-tuned rung: every configuration its search trained; the frozen "
        "rung: extraction + head search + refit). The frozen head is refit on train + validation, a fine-tuned "
        "model trains on train only (validation picks its epoch): the comparison leans against fine-tuning."], [
        Figure(assets.add("ladder.png", png, "fine-tuning ladder"), "Accuracy against training cost"),
        Table(["backbone", "method", "trained parameters", "test top-1 [95% CI]", "vs frozen (points, 95% CI)",
               "train wall s", "train img/s", "peak MB", "best/run epochs"], rows)])


def tuning_section(models: list[ModelRun], assets: Assets) -> Section:
    """Each frozen model's Optuna head search: the trial history and fANOVA importance."""
    section = Section("tuning", "Head search (Optuna)", [
        "Validation top-1 of every trial of the head search (hollow: pruned, shown at its last epoch) and the best "
        "so far; then fANOVA importance of each hyper-parameter. Tuning used the validation split carved from the "
        "training images, never the test images."])
    for m in models:
        study = m.study
        if study is None or not study.trials:
            note = study.note if study else "no Optuna study recorded for this model"
            section.paragraphs.append(f"{m.key}: {note}.")
            continue
        trials = study.trials
        numbers = np.array([t.number for t in trials])
        values = np.array([np.nan if t.value is None else t.value for t in trials], dtype=float)
        states, heads = [t.state for t in trials], [t.head for t in trials]
        hist = plots.png(plots.optimisation_history(numbers, values, states, heads, m.key))
        section.blocks.append(Figure(assets.add(f"optuna-history-{m.key}.png", hist, f"{m.key} optimisation history"),
                                     f"{m.key}: {len(trials)} trials, "
                                     f"{sum(t.state == 'COMPLETE' for t in trials)} complete, "
                                     f"{sum(t.state == 'PRUNED' for t in trials)} pruned"))
        if study.importance:
            n_complete = sum(t.state == "COMPLETE" for t in trials)
            imp = plots.png(plots.parameter_importance(study.importance, m.key, n_complete))
            section.blocks.append(Figure(assets.add(f"optuna-importance-{m.key}.png", imp,
                                                    f"{m.key} hyper-parameter importance"),
                                         f"{m.key}: hyper-parameter importance, fANOVA over {n_complete} complete "
                                         "trials; parameters that only some heads have (MLP width, depth) are left "
                                         "out when a complete trial lacks them"))
        elif study.note:
            section.paragraphs.append(f"{m.key}: {study.note}.")
    return section


def seeds_section(runs: list[RunFolder]) -> Section | None:
    """Each run's repetition over seeds: every model's spread, and every comparison's per-seed difference."""
    repeated = [(r, r.results["seeds"]) for r in runs if (r.results.get("seeds") or {}).get("n", 1) > 1]
    if not repeated:
        return None
    section = Section("seeds", "Seeds", [
        "Does the verdict survive another seed? The validation split, the head search, the refit and the test "
        "scoring were repeated with other seeds on the cached features (seed 0 is the run above); the test images "
        "are the same in every repetition."])
    for run, s in repeated:
        prefix = f"{run.name}/" if len(runs) > 1 else ""
        rows: list[list[Cell]] = []
        for label, t in s["models"].items():
            for method, name in (("tuned", "tuned head"), ("baseline", "baseline")):
                if method in t:
                    v = t[method]
                    per_seed = " ".join(f"{x * 100:.2f}" for x in v["values"])
                    rows.append([prefix + label, name, pct(v["mean"]), f"{v['std'] * 100:.2f}",
                                 f"{pct(v['min'])} .. {pct(v['max'])}", per_seed])
        section.blocks.append(Table(["model", "method", "mean test top-1", "sd (points)", "range", "per seed"], rows,
                                    f"{s['n']} seeds"))
        for c in s["comparisons"]:
            d = c["delta"]
            section.paragraphs.append(
                f"{prefix}{c['a']} - {prefix}{c['b']}: {d['mean'] * 100:+.2f} points on average over {s['n']} seeds "
                f"(sd {d['std'] * 100:.2f}, range {d['min'] * 100:+.2f} to {d['max'] * 100:+.2f}); {c['a']} is "
                f"ahead in {c['a_better_in']} of them, {c['b']} in {c['b_better_in']}.")
    return section


def extra_test_section(runs: list[RunFolder]) -> Section | None:
    """Each second test set (data.extra_test): every model's scores on it and the paired comparisons there."""
    if not any(r.results.get("extra_test") for r in runs):
        return None
    section = Section("extra-test", "Second test sets", [
        "Does it hold on other photos? Each second test set is scored by the same tuned heads (calibrated) and "
        "baselines as the test split; its class folders carry the dataset's class names. Not used for anything "
        "but these scores."])
    for run in runs:
        prefix = f"{run.name}/" if len(runs) > 1 else ""
        for name, info in (run.results.get("extra_test") or {}).items():
            rows: list[list[Cell]] = []
            for label, r in run.results["models"].items():
                e = (r.get("extra_test") or {}).get(name)
                if not e:
                    continue
                base = e.get("baseline")
                rows.append([prefix + label, f"{pct(e['top1'])} {interval(e['top1_ci95'])}", pct(e["top5"]),
                             f"{e['macro_f1']:.4f}", f"{e['calibration']['ece']:.4f}",
                             f"{pct(base['top1'])} {interval(base['top1_ci95'])}" if base else "-"])
            section.blocks.append(Table(["model", "top-1 [95% CI]", "top-5", "macro-F1", "ECE", "baseline top-1"],
                                        rows, f"{name}: {info['n']} images ({info['root']}), {info['skipped']} "
                                              "unreadable skipped"))
            section.paragraphs += [f"On {name}: {verdict(c)}" for c in info.get("comparisons") or []]
    return section


def efficiency_section(runs: list[RunFolder], assets: Assets, colours: dict[str, str]) -> Section | None:
    """The data-efficiency curves of every run that has them, in one figure, and their table."""
    curves: dict[str, Any] = {}
    rows: list[list[Cell]] = []
    for run in runs:
        d = run.results.get("data_efficiency") or {}
        for label, per_k in (d.get("models") or {}).items():
            key = f"{run.name}/{label}" if len(runs) > 1 else label
            curves[key] = per_k
            rows += [[key, k, f"{pct(p['tuned']['mean'])} +- {p['tuned']['std'] * 100:.2f}",
                      f"{pct(p['baseline']['mean'])} +- {p['baseline']['std'] * 100:.2f}" if "baseline" in p else "-",
                      str(len(p["tuned"]["runs"]))] for k, p in per_k.items()]
    if not curves:
        return None
    d = next(r.results["data_efficiency"] for r in runs if r.results.get("data_efficiency", {}).get("models"))
    png = plots.png(plots.data_efficiency(curves, colours))
    return Section("efficiency", "Data efficiency", [
        f"How many labelled photos per breed does each backbone need? Test top-1 with k training images per class "
        f"(drawn from the training split with {d['seeds']} seeds; the validation split stays whole for choosing C "
        f"and tuning), for a head tuned with {d['trials']} trials and for the logistic-regression baseline, on the "
        "cached features. Bands span the seeds."],
        [Figure(assets.add("data-efficiency.png", png, "data efficiency curves"), "Accuracy against images per class"),
         Table(["model", "images per class", "tuned head (mean +- sd, points)", "baseline", "seeds"], rows)])
