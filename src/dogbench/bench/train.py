"""``dogbench bench --train``: is fine-tuning as fast as its training step, and faster than the recipe people write?

For each backbone (method ``full``, ``finetune.batch_size`` images per step, the run's training precision), in
rounds, it times:

- ``step``: the training step alone (``training.Stepper``: normalise, forward, loss, backward, AdamW) on a
  synthetic uint8 batch already in memory;
- ``e2e``: ``training.train`` itself over real images: sampler, decoding in the thread pool, timm's training
  transform seeded per image, the step; validation and checkpoints are outside the timed steps;
- ``e2e_fp32``: the same in fp32 when the run trains in bf16 (the recipe's precision: a like-for-like ratio);
- ``recipe``: what people write by hand, in a fresh process: torchvision ``ImageFolder`` + timm's
  ``create_transform(is_training=True)`` + ``DataLoader(batch_size, shuffle=True)`` with every other setting at
  its default + a plain fp32 loop (``model.train()``, ``cross_entropy``, ``backward``, ``AdamW.step``).

Every figure is images per second over the steps after the first (warm-up), the median over rounds; every
ratio is the median of the per-round ratios (``e2e / step`` and ``e2e / recipe``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dogbench.atomic import atomic_write_json, atomic_write_text
from dogbench.backbones import Backbone, load_backbone
from dogbench.bench.common import bench_images, jsonable, loadavg, machine_info, sync_device, table_lines
from dogbench.config import BackboneConfig, RunConfig, crops_to_box
from dogbench.data import Dataset, Sample
from dogbench.device import Policy, device_name
from dogbench.errors import DogbenchError
from dogbench.protocols.finetune import train_files
from dogbench.training import (
    Stepper,
    TrainData,
    TrainParams,
    build_trainable,
    load_for_training,
    resolve_params,
    set_train_mode,
    train,
)

COLUMNS = ("label", "model", "weights", "device", "precision", "batch_size", "steps", "repeats", "params",
           "step_samples_per_sec", "e2e_samples_per_sec", "recipe_samples_per_sec", "e2e_over_step",
           "e2e_over_recipe", "recipe_precision", "e2e_fp32_samples_per_sec", "e2e_fp32_over_recipe")


def _rate(stamps: list[float], batch_size: int) -> float:
    """Images per second between the first step's end and the last's (the first step is warm-up)."""
    if len(stamps) < 2:
        raise DogbenchError("bench --train needs at least 2 timed steps (bench.model_batches >= 1)")
    return batch_size * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def _setup(bcfg: BackboneConfig, cfg: RunConfig, policy: Policy) -> tuple[Backbone, TrainParams]:
    """The backbone loaded for training and the ``full`` method's recipe for it."""
    backbone = load_for_training(bcfg, resolve_params(cfg.finetune, "full", is_vit=False, policy=policy))
    return backbone, resolve_params(cfg.finetune, "full", is_vit=backbone.is_vit, policy=policy)


def step_alone(bcfg: BackboneConfig, cfg: RunConfig, *, steps: int, policy: Policy) -> float:
    """Images per second of the training step on a synthetic batch resident on the device."""
    backbone, params = _setup(bcfg, cfg, policy)
    trainable = build_trainable(backbone, 120, params)
    stepper = Stepper(trainable, backbone.preprocess, params, policy=policy, n_classes=120, total_steps=1000,
                      steps_per_epoch=100)
    device = policy.device
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (params.batch_size, *backbone.preprocess.input_size), dtype=torch.uint8,
                      generator=g).to(device)
    y = torch.randint(0, 120, (params.batch_size,), generator=g).to(device)
    set_train_mode(trainable.model, freeze_bn_stats=params.freeze_bn_stats)
    stamps = []
    for step in range(steps + 2):  # one more warm-up step than the timed ones start from
        stepper.forward_backward(x, y)
        stepper.optimizer_step(step)
        sync_device(device)
        if step >= 1:
            stamps.append(time.perf_counter())
    return _rate(stamps, params.batch_size)


def end_to_end(bcfg: BackboneConfig, cfg: RunConfig, samples: tuple[Sample, ...], *, steps: int,
               policy: Policy, precision: str | None = None) -> float:
    """Images per second of ``training.train`` over ``samples`` (one epoch of ``steps + 1`` steps), in the run's
    training precision or ``precision``."""
    backbone, params = _setup(bcfg, cfg, policy)
    params = dataclasses.replace(params, epochs=1, precision=precision or params.precision)
    labels = np.asarray([s.label for s in samples], dtype=np.int64) % 120
    n = params.batch_size * (steps + 1)
    val = slice(n, n + 1) if len(samples) > n else slice(0, 1)  # one image: validation is not timed
    data = TrainData(samples[:n], labels[:n], samples[val], labels[val], 120, crop_to_box=crops_to_box(cfg, bcfg),
                     reduced_decode=cfg.features.reduced_decode, decoder=cfg.features.decoder)
    trainable = build_trainable(backbone, 120, params)
    stamps: list[float] = []

    def on_step(step: int) -> None:
        sync_device(policy.device)
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="dogbench-train-bench-") as out:
        train(trainable, backbone, data, params, train_files(Path(out)), policy=policy, progress=False,
              on_step=on_step)
    return _rate(stamps, params.batch_size)


def recipe(bcfg: BackboneConfig, samples: tuple[Sample, ...], *, batch_size: int, steps: int,
           device: torch.device) -> float:
    """The hand-written training loop in a fresh process over links to ``samples``; images per second."""
    with tempfile.TemporaryDirectory(prefix="dogbench-train-recipe-") as tmp:
        root = Path(tmp) / "images"
        for s in samples[: batch_size * (steps + 1)]:
            folder = root / f"{s.label:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / (s.sample_id.replace("/", "__") + s.path.suffix.lower())).symlink_to(s.path.resolve())
        spec = {"backbone": jsonable(dataclasses.asdict(bcfg)), "root": str(root), "batch_size": batch_size,
                "steps": steps, "device": str(device), "out": tmp}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        child = subprocess.run(
            [sys.executable, "-m", "dogbench.bench.train", "recipe", str(Path(tmp) / "spec.json")],
            capture_output=True, text=True, check=False)
        if child.returncode != 0:
            raise DogbenchError(f"The training recipe process failed (exit {child.returncode}): "
                                f"{child.stderr[-2000:]}")
        return json.loads((Path(tmp) / "recipe.json").read_text())["samples_per_sec"]


def _recipe_child(spec_path: Path) -> None:
    """The recipe as people write it: timm's training transform, ImageFolder, a default DataLoader, fp32."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    spec = json.loads(spec_path.read_text())
    backbone = load_backbone(BackboneConfig(**spec["backbone"]))
    device = torch.device(spec["device"])
    model = torch.nn.Sequential(backbone.model, torch.nn.Linear(backbone.feature_dim, 120)).to(device)
    model.requires_grad_(True).train()
    pre = backbone.preprocess
    transform = create_transform(input_size=pre.input_size, is_training=True, interpolation=pre.interpolation,
                                 mean=pre.mean, std=pre.std)
    loader = torch.utils.data.DataLoader(ImageFolder(spec["root"], transform=transform),
                                         batch_size=spec["batch_size"], shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    stamps = []
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sync_device(device)
        stamps.append(time.perf_counter())
    rate = spec["batch_size"] * (len(stamps) - 1) / (stamps[-1] - stamps[0])
    (Path(spec["out"]) / "recipe.json").write_text(json.dumps({"samples_per_sec": rate}))


@dataclass(frozen=True)
class TrainBenchResults:
    rows: tuple[dict[str, Any], ...]
    rounds: tuple[dict[str, list[float]], ...]
    machine: dict[str, Any]
    dataset: str
    seconds: float

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in COLUMNS} for r in self.rows)
        return out.getvalue()

    def summary_table(self) -> str:
        header = ["model", "batch", "precision", "step img/s", "e2e img/s", "e2e/step", "recipe img/s (fp32)",
                  "e2e/recipe", "e2e fp32 img/s", "e2e fp32/recipe"]
        body = [[f"{r['label']} ({r['model']})", str(r["batch_size"]), r["precision"],
                 f"{r['step_samples_per_sec']:.2f}", f"{r['e2e_samples_per_sec']:.2f}", f"{r['e2e_over_step']:.3f}",
                 f"{r['recipe_samples_per_sec']:.2f}" if "recipe_samples_per_sec" in r else "-",
                 f"{r['e2e_over_recipe']:.2f}x" if "e2e_over_recipe" in r else "-",
                 f"{r['e2e_fp32_samples_per_sec']:.2f}" if "e2e_fp32_samples_per_sec" in r else "-",
                 f"{r['e2e_fp32_over_recipe']:.2f}x" if "e2e_fp32_over_recipe" in r else "-"] for r in self.rows]
        return "\n".join([*table_lines(f"dogbench bench --train on {self.dataset}", self.machine,
                                        self.rows[0]["repeats"] if self.rows else 0, header, body),
                          f"total {self.seconds:.1f} s"])

    def write(self, out: Path, cfg: RunConfig) -> None:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
        atomic_write_text(out / "train_bench.csv", self.to_csv())
        atomic_write_json(out / "train_bench.json", {"machine": self.machine, "dataset": self.dataset,
                                                     "seconds": self.seconds, "rows": list(self.rows),
                                                     "rounds": list(self.rounds)})
        atomic_write_text(out / "summary.txt", self.summary_table() + "\n")


def run_train_bench(cfg: RunConfig, dataset: Dataset, *, progress: bool = True) -> TrainBenchResults:
    """Rounds of (step alone, end to end, recipe) for every configured backbone, one model at a time."""
    policy = Policy.resolve(cfg.features.device, cfg.features.precision, cfg.finetune.precision)
    device = policy.device
    steps, repeats = max(2, cfg.bench.model_batches), cfg.bench.repeats
    batch = cfg.finetune.batch_size
    subset = bench_images(dataset, batch * (steps + 1) + 1)
    samples = tuple(sorted(subset.samples, key=lambda s: s.sample_id))
    if len(samples) < batch * (steps + 1):
        raise DogbenchError(f"bench --train needs {batch * (steps + 1)} images ({steps + 1} steps of "
                            f"{batch}); {dataset.root} has {len(samples)}")
    start, load_before = time.perf_counter(), loadavg()
    rows, all_rounds = [], []
    for bcfg in cfg.backbones:
        backbone, params = _setup(bcfg, cfg, policy)  # what the row reports; each mode loads its own copy
        rounds: dict[str, list[float]] = {}
        for _ in tqdm(range(repeats), desc=f"bench --train {bcfg.label}", unit="round", disable=not progress):
            got = {"step": step_alone(bcfg, cfg, steps=steps, policy=policy),
                   "e2e": end_to_end(bcfg, cfg, samples, steps=steps, policy=policy)}
            if cfg.bench.recipe:
                got["recipe"] = recipe(bcfg, samples, batch_size=batch, steps=steps, device=device)
                if params.precision != "fp32":  # in the recipe's precision too, for a like-for-like ratio
                    got["e2e_fp32"] = end_to_end(bcfg, cfg, samples, steps=steps, policy=policy, precision="fp32")
            for k, v in got.items():
                rounds.setdefault(k, []).append(v)
        row: dict[str, Any] = {
            "label": bcfg.label, "model": backbone.tag, "weights": bcfg.weights if bcfg.weights in ("hub", "random")
            else Path(bcfg.weights).name, "device": device_name(device), "precision": params.precision,
            "batch_size": batch, "steps": steps, "repeats": repeats, "params": backbone.params,
            "step_samples_per_sec": round(statistics.median(rounds["step"]), 3),
            "e2e_samples_per_sec": round(statistics.median(rounds["e2e"]), 3),
            "e2e_over_step": round(statistics.median(a / b for a, b in zip(rounds["e2e"], rounds["step"],
                                                                            strict=True)), 3),
        }
        if "recipe" in rounds:
            ratio = statistics.median(a / b for a, b in zip(rounds["e2e"], rounds["recipe"], strict=True))
            row |= {"recipe_samples_per_sec": round(statistics.median(rounds["recipe"]), 3),
                    "recipe_precision": "fp32", "e2e_over_recipe": round(ratio, 3)}
        if "e2e_fp32" in rounds:
            ratio = statistics.median(a / b for a, b in zip(rounds["e2e_fp32"], rounds["recipe"], strict=True))
            row |= {"e2e_fp32_samples_per_sec": round(statistics.median(rounds["e2e_fp32"]), 3),
                    "e2e_fp32_over_recipe": round(ratio, 3)}
        rows.append(row)
        all_rounds.append(rounds)
        del backbone
    machine = machine_info(device) | {"loadavg_1min_before": load_before, "loadavg_1min_after": loadavg()}
    return TrainBenchResults(tuple(rows), tuple(all_rounds), machine, dataset.name, time.perf_counter() - start)


if __name__ == "__main__":  # the recipe's own process: python -m dogbench.bench.train recipe SPEC.json
    if len(sys.argv) != 3 or sys.argv[1] != "recipe":
        sys.exit("usage: python -m dogbench.bench.train recipe SPEC.json (run by dogbench bench --train)")
    _recipe_child(Path(sys.argv[2]))
