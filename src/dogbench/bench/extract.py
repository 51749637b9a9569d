"""``dogbench bench``: is extraction as fast as the model, and the model as fast as the hardware?

For each backbone, in rounds (so that a noisy machine slows every measurement alike), it times:

- ``matmul``: a large square matrix product on the device, in the precision the model runs in (the achievable
  FLOP rate, ``peak_gflops``);
- ``model``: the model alone on synthetic batches already on the device (timm's ``infer_*`` figures);
- ``decode``: reading, decoding and preprocessing the images alone, with the loader extraction uses;
- ``e2e``: ``extract_features`` itself over the same images into a fresh cache folder (chunks written);
- ``recipe``: what people write by hand: torchvision ``ImageFolder`` + timm's eval transform + a ``DataLoader``
  with default settings (batch size as dogbench's) + ``model(x)`` under ``torch.no_grad()``.

Every figure is the median over rounds; every ratio is the median of the per-round ratios. The CSV has timm's
benchmark columns first, then ``achieved_gflops``, ``peak_gflops``, ``pipeline_efficiency`` (end-to-end /
model-only) and ``compute_efficiency`` (achieved / peak), then the rest.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dogbench.atomic import atomic_write_json, atomic_write_text
from dogbench.backbones import Backbone, load_backbone, measure_gflops
from dogbench.bench.common import bench_images, jsonable, loadavg, machine_info, sync_device, table_lines
from dogbench.config import BackboneConfig, Precision, RunConfig, crops_to_box
from dogbench.data import Dataset, Sample
from dogbench.device import DTYPES, Policy, device_name, exact_fp32, resolve_workers
from dogbench.errors import DogbenchError
from dogbench.features import ImageDataset, ModelRunner, effective_decoder, extract_features, iter_batches

TIMM_COLUMNS = ("model", "infer_img_size", "infer_samples_per_sec", "infer_step_time", "infer_batch_size",
                "param_count", "infer_gmacs")
DOGBENCH_COLUMNS = ("achieved_gflops", "peak_gflops", "pipeline_efficiency", "compute_efficiency")
EXTRA_COLUMNS = ("label", "weights", "device", "precision", "batch_size", "workers", "images", "repeats",
                 "decode_samples_per_sec", "e2e_samples_per_sec", "recipe_samples_per_sec", "speedup_vs_recipe",
                 "recipe_max_abs_diff", "compiled_samples_per_sec", "compile_speedup", "compile_s",
                 "projected_s_per_1000")


@dataclass(frozen=True)
class BenchRow:
    """One backbone's medians (per-round values kept in ``rounds``)."""

    values: dict[str, Any]
    rounds: dict[str, list[float]]

    def csv_row(self) -> dict[str, Any]:
        return {k: self.values.get(k, "") for k in (*TIMM_COLUMNS, *DOGBENCH_COLUMNS, *EXTRA_COLUMNS)}


def matmul_gflops(device: torch.device, precision: Precision, *, size: int | None, reps: int = 5) -> float:
    """Median GFLOP/s of ``reps`` (size x size) @ (size x size) products in the run's precision (exact fp32)."""
    size = size or (2048 if device.type == "cpu" else 8192)
    dtype = DTYPES.get(precision, torch.float32)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device, dtype)
    b = torch.randn(size, size, generator=gen).to(device, dtype)
    with exact_fp32(device, precision):
        torch.mm(a, b)
        times = []
        for _ in range(reps):
            sync_device(device)
            start = time.perf_counter()
            torch.mm(a, b)
            sync_device(device)
            times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def model_only(runner: ModelRunner, batch_size: int, *, batches: int, warmup: int = 2) -> list[float]:
    """Seconds per forward pass of a synthetic, already normalised batch resident on the device."""
    shape = (batch_size, *runner.preprocess.input_size)
    x = runner.prepare(torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    for _ in range(warmup):
        runner.run_model(x)
    sync_device(runner.device)
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        runner.run_model(x)
        sync_device(runner.device)
        times.append(time.perf_counter() - start)
    return times


def decode_only(images: ImageDataset, batch_size: int, *, workers: int, prefetch: int, pin: bool) -> float:
    """Seconds to produce every batch of ``images`` with extraction's loader, and nothing else."""
    n = len(images)
    batches = [list(range(b, min(b + batch_size, n))) for b in range(0, n, batch_size)]
    start = time.perf_counter()
    for _ in iter_batches(images, batches, workers=workers, prefetch=prefetch, pin_memory=pin):
        pass
    return time.perf_counter() - start


def recipe_features(
    bcfg: BackboneConfig, samples: tuple[Sample, ...], *, batch_size: int, device: torch.device
) -> tuple[float, np.ndarray]:
    """The hand-written baseline on the same images and model: (seconds, features in sample-id order).

    Runs in a fresh Python process, as a user's script would (default allocator, its own model copy in the
    default memory format): torchvision ``ImageFolder`` over a folder of links to the images, timm's eval
    transform with the backbone's preprocessing, ``DataLoader(batch_size=...)`` with every other setting at
    its default, the model in eval mode under ``torch.no_grad()``. One untimed warm-up pass on zeros first,
    as dogbench's timings also start warm.
    """
    with tempfile.TemporaryDirectory(prefix="dogbench-recipe-") as tmp:
        root = Path(tmp) / "images"
        for s in samples:  # class folder per label; files named by sample id so ImageFolder's order is id order
            folder = root / f"{s.label:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / (s.sample_id.replace("/", "__") + s.path.suffix.lower())).symlink_to(s.path.resolve())
        spec = {"backbone": jsonable(dataclasses.asdict(bcfg)), "root": str(root), "batch_size": batch_size,
                "device": str(device), "out": tmp}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        child = subprocess.run(
            [sys.executable, "-m", "dogbench.bench.extract", "recipe", str(Path(tmp) / "spec.json")],
            capture_output=True, text=True, check=False,
        )
        if child.returncode != 0:
            raise DogbenchError(f"The recipe process failed (exit {child.returncode}): {child.stderr[-2000:]}")
        seconds = json.loads((Path(tmp) / "recipe.json").read_text())["seconds"]
        features = np.load(Path(tmp) / "features.npy")
        names = json.loads((Path(tmp) / "recipe.json").read_text())["names"]
    return seconds, features[np.argsort(names)]  # back to sample-id order, whatever the class folders did


def _recipe_child(spec_path: Path) -> None:
    """The recipe itself, as people write it (timed from building the loader to the last batch)."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    spec = json.loads(spec_path.read_text())
    bcfg = BackboneConfig(**spec["backbone"])
    backbone = load_backbone(bcfg)
    device = torch.device(spec["device"])
    model = backbone.model.to(device)
    with torch.no_grad():
        model(torch.zeros((spec["batch_size"], *backbone.preprocess.input_size), device=device))
    sync_device(device)
    start = time.perf_counter()
    transform = create_transform(**dataclasses.asdict(backbone.preprocess), is_training=False)
    dataset = ImageFolder(spec["root"], transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=spec["batch_size"])
    outputs = []
    with torch.no_grad():
        for x, _ in loader:
            outputs.append(model(x.to(device)).float().cpu())
    seconds = time.perf_counter() - start
    out = Path(spec["out"])
    np.save(out / "features.npy", torch.cat(outputs).numpy())
    names = [Path(p).name for p, _ in dataset.samples]
    (out / "recipe.json").write_text(json.dumps({"seconds": seconds, "names": names}))


def bench_backbone(
    backbone_cfg: BackboneConfig, dataset: Dataset, *, cfg: RunConfig, progress: bool = True,
    on_round: Callable[[int, dict[str, float]], None] | None = None, policy: Policy | None = None,
) -> BenchRow:
    """Rounds of matmul / model / decode / end-to-end / recipe for one backbone; medians and ratios."""
    fcfg, bcfg = cfg.features, cfg.bench
    backbone = load_backbone(backbone_cfg)
    policy = policy or Policy.resolve(fcfg.device, fcfg.precision)
    device, precision = policy.device, policy.precision
    gmacs = measure_gflops(backbone) / 2  # before the model moves: the counter runs on the CPU
    runner = ModelRunner.create(backbone, policy=policy, reuse_host_memory=fcfg.reuse_host_memory)
    batch_size = runner.resolve_batch_size(fcfg.batch_size)
    workers = resolve_workers(fcfg.num_workers, device)
    subset = bench_images(dataset, bcfg.images)
    samples = tuple(sorted(subset.samples, key=lambda s: s.sample_id))
    pre = backbone.preprocess
    images = ImageDataset.for_preprocess(
        samples, pre, crop_to_box=crops_to_box(cfg, backbone_cfg), reduced_decode=fcfg.reduced_decode,
        decoder=effective_decoder(fcfg.decoder, pre),
    )
    compiled, compile_s = None, None
    if bcfg.compare_compile:
        compiled, compile_s = _compiled_runner(backbone, policy, batch_size,
                                               reuse_host_memory=fcfg.reuse_host_memory)
    rounds: dict[str, list[float]] = {}
    recipe_diff = None
    for r in tqdm(range(bcfg.repeats), desc=f"bench {backbone.label}", unit="round", disable=not progress):
        got: dict[str, float] = {"peak_gflops": matmul_gflops(device, precision, size=bcfg.matmul_size)}
        steps = model_only(runner, batch_size, batches=bcfg.model_batches)
        got["model_samples_per_sec"] = batch_size * len(steps) / sum(steps)
        got["step_s"] = statistics.median(steps)
        if compiled is not None:
            c_steps = model_only(compiled, batch_size, batches=bcfg.model_batches)
            got["compiled_samples_per_sec"] = batch_size * len(c_steps) / sum(c_steps)
        got["decode_samples_per_sec"] = len(samples) / decode_only(
            images, batch_size, workers=workers, prefetch=fcfg.prefetch, pin=device.type == "cuda")
        with tempfile.TemporaryDirectory(prefix="dogbench-bench-") as cache:
            run_cfg = dataclasses.replace(fcfg, cache_dir=cache, batch_size=batch_size, compile=False)
            start = time.perf_counter()
            feats = extract_features(
                backbone, subset, cfg=run_cfg, crop_to_box=crops_to_box(cfg, backbone_cfg), progress=False,
                runner=runner, policy=policy,
            )
            got["e2e_samples_per_sec"] = len(samples) / (time.perf_counter() - start)
        if bcfg.recipe:
            seconds, recipe = recipe_features(backbone_cfg, samples, batch_size=batch_size, device=device)
            got["recipe_samples_per_sec"] = len(samples) / seconds
            if recipe.shape == feats.features.shape:
                recipe_diff = float(np.abs(recipe - feats.features).max())
        for key, value in got.items():
            rounds.setdefault(key, []).append(value)
        if on_round is not None:
            on_round(r, got)
    return _row(backbone, rounds, gmacs=gmacs, device=device, precision=precision, batch_size=batch_size,
                workers=workers, images=len(samples), repeats=bcfg.repeats, recipe_diff=recipe_diff,
                compile_s=compile_s)


def _compiled_runner(
    backbone: Backbone, policy: Policy, batch_size: int, *, reuse_host_memory: bool
) -> tuple[ModelRunner, float]:
    """A torch.compile'd runner, and the seconds its first batch took (compilation included)."""
    runner = ModelRunner.create(backbone, policy=policy, compile=True, reuse_host_memory=reuse_host_memory)
    start = time.perf_counter()
    model_only(runner, batch_size, batches=1, warmup=0)
    return runner, time.perf_counter() - start


def _median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def _row(
    backbone: Backbone, rounds: dict[str, list[float]], *, gmacs: float, device: torch.device,
    precision: Precision, batch_size: int, workers: int, images: int, repeats: int, recipe_diff: float | None,
    compile_s: float | None,
) -> BenchRow:
    med = {k: statistics.median(v) for k, v in rounds.items()}
    achieved = med["model_samples_per_sec"] * 2 * gmacs
    # Per-round ratios: each pairs measurements taken seconds apart, under the same machine load.
    achieved_rounds = [s * 2 * gmacs for s in rounds["model_samples_per_sec"]]
    values: dict[str, Any] = {
        "model": backbone.tag,
        "infer_img_size": backbone.preprocess.input_size[-1],
        "infer_samples_per_sec": round(med["model_samples_per_sec"], 2),
        "infer_step_time": round(1000 * med["step_s"], 3),
        "infer_batch_size": batch_size,
        "param_count": round(backbone.params / 1e6, 2),
        "infer_gmacs": round(gmacs, 4),
        "gflop_per_image": 2 * gmacs,  # unrounded, bench.json only (1 MAC = 2 FLOPs)
        "achieved_gflops": round(achieved, 1),
        "peak_gflops": round(med["peak_gflops"], 1),
        "pipeline_efficiency": round(_median_ratio(rounds["e2e_samples_per_sec"], rounds["model_samples_per_sec"]), 3),
        "compute_efficiency": round(_median_ratio(achieved_rounds, rounds["peak_gflops"]), 3),
        "label": backbone.label,
        "weights": backbone.weights if backbone.weights in ("hub", "random") else Path(backbone.weights).name,
        "device": device_name(device),
        "precision": precision.value,
        "batch_size": batch_size,
        "workers": workers,
        "images": images,
        "repeats": repeats,
        "decode_samples_per_sec": round(med["decode_samples_per_sec"], 1),
        "e2e_samples_per_sec": round(med["e2e_samples_per_sec"], 2),
        "projected_s_per_1000": round(1000 / med["e2e_samples_per_sec"], 1),
    }
    if "recipe_samples_per_sec" in rounds:
        values["recipe_samples_per_sec"] = round(med["recipe_samples_per_sec"], 2)
        values["speedup_vs_recipe"] = round(
            _median_ratio(rounds["e2e_samples_per_sec"], rounds["recipe_samples_per_sec"]), 3)
        values["recipe_max_abs_diff"] = f"{recipe_diff:.2e}" if recipe_diff is not None else ""
    if "compiled_samples_per_sec" in rounds:
        values["compiled_samples_per_sec"] = round(med["compiled_samples_per_sec"], 2)
        values["compile_speedup"] = round(
            _median_ratio(rounds["compiled_samples_per_sec"], rounds["model_samples_per_sec"]), 3)
        values["compile_s"] = round(compile_s or 0.0, 1)
    return BenchRow(values=values, rounds=rounds)


@dataclass(frozen=True)
class BenchResults:
    rows: tuple[BenchRow, ...]
    machine: dict[str, Any]
    dataset: str
    seconds: float

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=[*TIMM_COLUMNS, *DOGBENCH_COLUMNS, *EXTRA_COLUMNS],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(r.csv_row() for r in self.rows)
        return out.getvalue()

    def summary_table(self) -> str:
        header = ["model", "batch", "model img/s", "decode img/s", "e2e img/s", "e2e/model", "GFLOP/s",
                  "peak", "compute eff", "recipe img/s", "vs recipe"]
        body = []
        for r in self.rows:
            v = r.values
            body.append([
                f"{v['label']} ({v['model']})", str(v["batch_size"]), f"{v['infer_samples_per_sec']:.2f}",
                f"{v['decode_samples_per_sec']:.1f}", f"{v['e2e_samples_per_sec']:.2f}",
                f"{v['pipeline_efficiency']:.3f}", f"{v['achieved_gflops']:.1f}", f"{v['peak_gflops']:.1f}",
                f"{v['compute_efficiency']:.3f}", str(v.get("recipe_samples_per_sec", "-")),
                f"{v['speedup_vs_recipe']:.2f}x" if "speedup_vs_recipe" in v else "-",
            ])
        lines = table_lines(f"dogbench bench on {self.dataset}", self.machine,
                            self.rows[0].values["repeats"] if self.rows else 0, header, body)
        compiled = [r.values for r in self.rows if "compile_speedup" in r.values]
        lines += [f"torch.compile {v['label']}: {v['compiled_samples_per_sec']:.2f} img/s, "
                  f"{v['compile_speedup']:.3f}x eager, compile {v['compile_s']:.0f} s" for v in compiled]
        lines.append(f"total {self.seconds:.1f} s")
        return "\n".join(lines)

    def write(self, out: Path, cfg: RunConfig) -> None:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
        atomic_write_text(out / "bench.csv", self.to_csv())
        atomic_write_json(out / "bench.json", {
            "machine": self.machine, "dataset": self.dataset, "seconds": self.seconds,
            "rows": [{"values": r.values, "rounds": r.rounds} for r in self.rows],
        })
        atomic_write_text(out / "summary.txt", self.summary_table() + "\n")


def run_bench(cfg: RunConfig, dataset: Dataset, *, progress: bool = True) -> BenchResults:
    """Bench every configured backbone on ``dataset``; models are loaded one at a time."""
    if not dataset.samples:
        raise DogbenchError(f"Dataset {dataset.root} has no images to benchmark")
    start = time.perf_counter()
    load_before = loadavg()
    policy = Policy.resolve(cfg.features.device, cfg.features.precision)
    rows = []
    for bcfg in cfg.backbones:  # one model in memory at a time
        rows.append(bench_backbone(bcfg, dataset, cfg=cfg, progress=progress, policy=policy))
    machine = machine_info(policy.device) | {
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        # 1-minute load average before and after: above ~0.5 on an idle machine means something else competed.
        "loadavg_1min_before": load_before, "loadavg_1min_after": loadavg(),
    }
    return BenchResults(tuple(rows), machine, dataset.name, time.perf_counter() - start)


if __name__ == "__main__":  # the recipe's own process: python -m dogbench.bench.extract recipe SPEC.json
    if len(sys.argv) != 3 or sys.argv[1] != "recipe":
        sys.exit("usage: python -m dogbench.bench.extract recipe SPEC.json (run by dogbench bench)")
    _recipe_child(Path(sys.argv[2]))
