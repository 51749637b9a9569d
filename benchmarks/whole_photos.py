"""Where whole photos lose: dogbench's features of full-size photos against timm's PIL pipeline, and accuracy.

    .venv/bin/python benchmarks/whole_photos.py --json whole_photos.json

On ``../shared``: the 80 full-size photos of ``stanford-dogs-originals`` (4 breeds) and EfficientNet-Lite0.

1. Features: each decoding factor of dogbench (decoder auto/pil, reduced-size decoding on/off, box crop)
   against timm's own eval pipeline (PIL open, convert RGB, ``create_transform(**resolve_data_config(model))``,
   fp32 CPU): max abs difference, relative L2 difference, cosine; plus the photos' modes, EXIF and sizes.
2. Accuracy: StandardScaler + LogisticRegression (C=1) on the default-path features of the dev set's 4,800
   train crops (120 breeds; cached under --cache), 120-way top-1 on the originals as whole photos (default path,
   ``predictor.Predictor`` as ``predict`` runs it, timm's PIL pipeline), cropped to their box, and cropped to their
   box and squashed to 224x224 as the dev crops were made; the ImageNet head's own top-1 as a reference.
   15 of the 80 originals are dev *train* crops too: accuracies are given on the 65 held-out photos and on all 80.
3. Reduced-size decoding on photos larger than these: mosaics of the originals' tiles at their own resolution
   (JPEG q90, 560-2400 px short side, under --cache), decoded in full and at each DCT scale (PIL draft), against
   timm's pipeline on the full decode, binned by the ratio of the decoded short side to the 256 px resize target;
   and ``load_image(min_side=256)`` as dogbench does it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import ExifTags, Image
from timm.data import create_transform, resolve_data_config

from dogbench.backbones import Backbone, load_backbone
from dogbench.config import BackboneConfig, FeatureConfig, Precision
from dogbench.data import Sample, load_image, open_dataset
from dogbench.device import Policy
from dogbench.features import ImageDataset, ModelRunner, iter_batches

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "weights/tf_efficientnet_lite0.in1k.safetensors"
IMAGENET = {"Maltese_dog": 153, "golden_retriever": 207, "German_shepherd": 235, "Saint_Bernard": 247}
FACTORS = {  # name -> ImageDataset.for_preprocess arguments (crop_to_box aside)
    "pil, full decode": {"decoder": "pil", "reduced_decode": False},
    "pil, reduced decode": {"decoder": "pil", "reduced_decode": True},
    "auto, full decode": {"decoder": "auto", "reduced_decode": False},
    "auto, reduced decode (default)": {"decoder": "auto", "reduced_decode": True},
}
DEFAULT = {"decoder": "auto", "reduced_decode": True}


def dogbench_features(runner: ModelRunner, backbone: Backbone, samples: tuple[Sample, ...], *, crop_to_box: bool,
                      decoder: str, reduced_decode: bool, batch_size: int = 64) -> np.ndarray:
    """(N, D) features through dogbench's one forward path (ImageDataset -> iter_batches -> ModelRunner)."""
    images = ImageDataset.for_preprocess(samples, backbone.preprocess, crop_to_box=crop_to_box,
                                         reduced_decode=reduced_decode, decoder=decoder)
    batches = [list(range(s, min(s + batch_size, len(samples)))) for s in range(0, len(samples), batch_size)]
    out = []
    for x, _, errors in iter_batches(images, batches, workers=0, prefetch=1, pin_memory=False):
        if any(errors):
            raise RuntimeError(next(e for e in errors if e))
        out.append(runner(x))
    return np.concatenate(out)


def timm_outputs(model: torch.nn.Module, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """timm's own eval pipeline on PIL images: (pre-logits features, ImageNet logits)."""
    transform = create_transform(**resolve_data_config(model=model))
    feats, logits = [], []
    with torch.inference_mode():
        for start in range(0, len(images), 32):
            x = torch.stack([transform(im) for im in images[start : start + 32]])
            f = model.forward_head(model.forward_features(x), pre_logits=True)
            feats.append(f.numpy())
            logits.append(model.get_classifier()(f).numpy())
    return np.concatenate(feats), np.concatenate(logits)


def compare(a: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    rel = np.linalg.norm(a - ref, axis=1) / np.linalg.norm(ref, axis=1)
    cos = (a * ref).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(ref, axis=1))
    return {"max_abs": float(np.abs(a - ref).max()), "rel_l2_max": float(rel.max()),
            "rel_l2_mean": float(rel.mean()), "cos_min": float(cos.min()), "n_rel_over_1e-3": int((rel > 1e-3).sum())}


def census(samples: tuple[Sample, ...], min_side: int) -> dict[str, Any]:
    modes, orientations, big, box_frac = Counter(), Counter(), [], []
    for s in samples:
        with Image.open(s.path) as im:
            modes[f"{im.format} {im.mode}"] += 1
            orientations[str(im.getexif().get(ExifTags.Base.Orientation))] += 1
            if min(im.size) >= 2 * min_side:
                big.append(f"{s.path.name} {im.size[0]}x{im.size[1]}")
            if s.box is not None:
                box_frac.append((s.box[2] - s.box[0]) * (s.box[3] - s.box[1]) / (im.size[0] * im.size[1]))
    return {"modes": dict(modes), "exif_orientation": dict(orientations), "reduced_decode_applies": big,
            "box_area_fraction_median": statistics.median(box_frac)}


def squashed_box(sample: Sample) -> Image.Image:
    """The photo cropped to its box and resized to 224x224 ignoring the aspect ratio, as the dev crops are."""
    with Image.open(sample.path) as im:
        return im.convert("RGB").crop(sample.box).resize((224, 224), Image.Resampling.BILINEAR)


def dev_train_features(runner: ModelRunner, backbone: Backbone, dev_root: Path, cache: Path) -> tuple[Any, ...]:
    """Default-path features of the dev set's train and test crops, cached as .npy under ``cache``."""
    dev = open_dataset(dev_root)
    out = []
    for split in ("train", "test"):
        samples = dev.split(split)
        path = cache / f"dev-{split}-lite0-auto-reduced.npy"
        if path.is_file():
            feats = np.load(path)
        else:
            t0 = time.perf_counter()
            feats = dogbench_features(runner, backbone, samples, crop_to_box=False, **DEFAULT)
            print(f"dev {split}: {len(samples)} images in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            cache.mkdir(parents=True, exist_ok=True)
            np.save(path, feats)
        out += [feats, np.array([s.label for s in samples])]
    return dev, *out


RULE_GAPS = (1.0, 2.0, 3.0)


def mosaics(samples: tuple[Sample, ...], folder: Path, *, count: int = 32, seed: int = 0) -> list[Path]:
    """JPEGs larger than any original, made of n x n tiles cut from the originals at their own resolution."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for m in range(count):
        path = folder / f"mosaic{m:02d}.jpg"
        paths.append(path)
        n = int(rng.integers(2, 7))
        short = int(rng.integers(560, 2400))
        th = max(short // n, 120)
        tw = int(th * rng.uniform(1.2, 1.5))
        if path.is_file():
            continue
        canvas = Image.new("RGB", (n * tw, n * th))
        for i in range(n * n):
            with Image.open(samples[int(rng.integers(len(samples)))].path) as im:
                tile = im.convert("RGB")
            if tile.width < tw or tile.height < th:  # too small for the tile: cut what there is, then enlarge
                tile = tile.resize((max(tw, tile.width), max(th, tile.height)), Image.Resampling.BICUBIC)
            x0, y0 = (tile.width - tw) // 2, (tile.height - th) // 2
            canvas.paste(tile.crop((x0, y0, x0 + tw, y0 + th)), ((i % n) * tw, (i // n) * th))
        canvas.save(path, quality=90)
    return paths


def _decode(path: Path, scale: int) -> Image.Image | None:
    """The JPEG decoded at 1/``scale`` in the DCT domain (PIL draft; 1 = full decode) as RGB; None if it cannot."""
    with Image.open(path) as im:
        size = im.size
        if scale > 1:
            im.draft("RGB", (im.width // scale, im.height // scale))  # PIL: the largest scale still >= this size
        out = im.convert("RGB")
    return out if round(size[0] / out.width) == scale else None


def _matched(img: Image.Image, full_size: tuple[int, int], scale: int, min_side: int) -> Image.Image:
    """A 1/``scale`` decode resized to exactly the size timm's short-side resize gives the full image, mapping
    the full image's extent (``full_size / scale`` decoded pixels: libjpeg rounds the decoded size up)."""
    w, h = full_size
    size = (min_side, int(min_side * h / w)) if w <= h else (int(min_side * w / h), min_side)
    return img.resize(size, Image.Resampling.BICUBIC, box=(0, 0, w / scale, h / scale))


def _seconds(fn: Any, repeats: int = 3) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def reduced_decode_study(model: torch.nn.Module, paths: list[Path], min_side: int) -> dict[str, Any]:
    """Decoding rules on large JPEGs against the full decode (timm's pipeline on both).

    Rule "gap g": the smallest DCT scale (1/2, 1/4, 1/8) whose short side is still >= g x the resize target
    (``min_side``), else the full decode; gap 1 is PIL's draft asked for the target itself. "dogbench
    load_image" is the scale ``load_image(min_side=...)`` picks. "geometry matched": the same decode resized to
    the full image's resize size and extent (the crop then covers the same part of the photo). Time: decode +
    resize + crop, best of 3, relative to the full decode.
    """
    transform = create_transform(**resolve_data_config(model=model))
    per_rule: dict[str, list[tuple[float, ...]]] = {f"gap {g:g}": [] for g in RULE_GAPS}
    per_rule["dogbench load_image"] = []
    for path in paths:
        decoded = {k: _decode(path, k) for k in (1, 2, 4, 8)}
        decoded = {k: im for k, im in decoded.items() if im is not None and min(im.size) >= min_side}
        full_size = decoded[1].size
        ours = load_image(path, min_side=min_side)
        scale_of_ours = next(k for k, im in decoded.items() if im.size == ours.size)
        scales = list(decoded)
        feats, logits = timm_outputs(model, [decoded[k] for k in scales])
        matched, _ = timm_outputs(model, [_matched(decoded[k], full_size, k, min_side) for k in scales])
        ref, ref_logits = feats[0:1], logits[0]
        seconds = {k: _seconds(lambda k=k, path=path: transform(_decode(path, k))) for k in decoded}
        picks = {f"gap {g:g}": max(k for k, im in decoded.items() if k == 1 or min(im.size) >= g * min_side)
                 for g in RULE_GAPS}
        picks["dogbench load_image"] = scale_of_ours
        for rule, k in picks.items():
            j = scales.index(k)
            c, cm = compare(feats[j : j + 1], ref), compare(matched[j : j + 1], ref)
            same = bool(logits[j].argmax() == ref_logits.argmax())
            pixels = decoded[k].width * decoded[k].height / (full_size[0] * full_size[1])
            per_rule[rule].append((c["rel_l2_max"], c["cos_min"], same, pixels, seconds[k] / seconds[1],
                                   cm["rel_l2_max"]))

    def summary(rows: list[tuple[float, ...]]) -> dict[str, float]:
        a = np.array(rows, dtype=np.float64)
        return {"rel_l2_mean": float(a[:, 0].mean()), "rel_l2_max": float(a[:, 0].max()),
                "cos_min": float(a[:, 1].min()), "imagenet_top1_unchanged": float(a[:, 2].mean()),
                "decoded_pixels_mean": float(a[:, 3].mean()), "time_vs_full_mean": float(a[:, 4].mean()),
                "geometry_matched_rel_l2_mean": float(a[:, 5].mean()),
                "geometry_matched_rel_l2_max": float(a[:, 5].max())}

    return {"rules": {rule: summary(rows) for rule, rows in per_rule.items()}, "n": len(paths),
            "short_side_range": [min(min(Image.open(p).size) for p in paths),
                                 max(min(Image.open(p).size) for p in paths)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/dogbench-whole-photos"))
    parser.add_argument("--json", type=Path, help="write the numbers here too")
    parser.add_argument("--mosaics", type=int, default=32, help="large JPEGs for the reduced-decoding study")
    args = parser.parse_args(argv)
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    weights = args.shared / WEIGHTS
    backbone = load_backbone(BackboneConfig(label="cnn", model="tf_efficientnet_lite0", weights=str(weights)))
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=True,
                                  pretrained_cfg_overlay={"file": str(weights)}).eval()
    runner = ModelRunner.create(backbone, policy=Policy.resolve("cpu", Precision.FP32))
    originals = open_dataset(args.shared / "data" / "stanford-dogs-originals")
    samples = originals.samples
    result: dict[str, Any] = {"census": census(samples, backbone.preprocess.min_side)}

    # 1. features against timm's PIL pipeline
    whole = [Image.open(s.path).convert("RGB") for s in samples]
    boxed = [im.crop(s.box) for im, s in zip(whole, samples, strict=True)]
    ref_whole, logits_whole = timm_outputs(reference, whole)
    ref_box, logits_box = timm_outputs(reference, boxed)
    ref_squash, _ = timm_outputs(reference, [squashed_box(s) for s in samples])
    feats: dict[str, np.ndarray] = {}
    table = {}
    for name, kw in FACTORS.items():
        feats[name] = dogbench_features(runner, backbone, samples, crop_to_box=False, **kw)
        table[f"whole photo, {name}"] = compare(feats[name], ref_whole)
    for name in ("pil, full decode", "auto, reduced decode (default)"):
        feats[f"box {name}"] = dogbench_features(runner, backbone, samples, crop_to_box=True, **FACTORS[name])
        table[f"box crop, {name}"] = compare(feats[f"box {name}"], ref_box)
    rel = np.linalg.norm(feats["auto, reduced decode (default)"] - ref_whole, axis=1) / np.linalg.norm(ref_whole,
                                                                                                         axis=1)
    result["features"] = table
    result["default_path_worst"] = {samples[i].path.name: float(rel[i]) for i in np.argsort(-rel)[:3]}

    # 2. accuracy: a head trained on dev crops, 120-way top-1 on the originals
    dev, x_train, y_train, x_test, y_test = dev_train_features(runner, backbone, args.shared / "data" /
                                                               "stanford-dogs-dev", args.cache)
    dev_folder = {p.parent.name: label for p, label in ((s.path, s.label) for s in dev.samples)}
    y = np.array([dev_folder[s.path.parent.name] for s in samples])
    dev_split = {s.sample_id: s.split for s in dev.samples}
    held_out = np.array([dev_split.get(s.sample_id) != "train" for s in samples])
    head = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    t0 = time.perf_counter()
    head.fit(x_train, y_train)
    print(f"head fitted in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    from dogbench.predictor import Predictor

    model = Predictor("cnn", backbone, head, classes=dev.classes, features=FeatureConfig(device="cpu",
                                                                                     precision=Precision.FP32))
    predict_proba, errors = model.predict_proba([s.path for s in samples])
    assert not any(errors)

    def score(pred: np.ndarray) -> dict[str, float]:
        ok = pred == y
        return {"held_out": float(ok[held_out].mean()), "all": float(ok.mean())}

    inputs = {
        "whole photo, dogbench default path": feats["auto, reduced decode (default)"],
        "whole photo, timm PIL pipeline": ref_whole,
        "box crop, dogbench default path (crop_to_box)": feats["box auto, reduced decode (default)"],
        "box crop squashed to 224x224 (as the dev crops)": ref_squash,
    }
    # The box crop with crop_mode "squash" (preprocessing override): the whole box, stretched to a square.
    squash = load_backbone(BackboneConfig(label="cnn", model="tf_efficientnet_lite0", weights=str(weights),
                                          crop_mode="squash"))
    squash_runner = ModelRunner.create(squash, policy=Policy.resolve("cpu", Precision.FP32))
    inputs["box crop, dogbench default path, crop_mode squash"] = dogbench_features(
        squash_runner, squash, samples, crop_to_box=True, **DEFAULT)
    inputs["whole photo, dogbench default path, crop_mode squash"] = dogbench_features(
        squash_runner, squash, samples, crop_to_box=False, **DEFAULT)
    accuracy = {name: score(head.predict(x)) for name, x in inputs.items()}
    classes = dev.classes
    result["misses"] = {
        name: [f"{samples[i].path.name} -> {classes[p]}" for i, p in enumerate(head.predict(x)) if p != y[i]]
        for name, x in inputs.items()
    }
    accuracy["whole photo, predictor.Predictor.predict_proba"] = score(predict_proba.argmax(1))
    accuracy["dev test crops (2,400, sanity)"] = {"all": float((head.predict(x_test) == y_test).mean())}
    from dogbench.heads import LinearHead, MLPHead

    for own in (LinearHead(), MLPHead()):  # dogbench's own heads, default hyperparameters
        own.fit(x_train, y_train)
        name = type(own).__name__
        accuracy[f"whole photo, dogbench default path, {name}"] = score(own.predict(inputs[
            "whole photo, dogbench default path"]))
        accuracy[f"dev test crops (2,400), {name}"] = {"all": float((own.predict(x_test) == y_test).mean())}
    imagenet = np.array([IMAGENET[originals.classes[s.label]] for s in samples])
    four = np.array(sorted(IMAGENET.values()))
    for name, logits in (("whole photo", logits_whole), ("box crop", logits_box)):
        ok = logits.argmax(1) == imagenet
        ok4 = four[logits[:, four].argmax(1)] == imagenet
        accuracy[f"ImageNet head, {name}, 1000-way"] = {"held_out": float(ok[held_out].mean()), "all": float(ok.mean())}
        accuracy[f"ImageNet head, {name}, among the 4"] = {"held_out": float(ok4[held_out].mean()),
                                                           "all": float(ok4.mean())}
    result["accuracy"] = accuracy
    result["n"] = {"all": len(samples), "held_out": int(held_out.sum())}

    # 3. reduced-size decoding where it applies: photos with a short side of 2x the resize target or more
    min_side = backbone.preprocess.min_side
    paths = mosaics(samples, args.cache / "mosaics", count=args.mosaics)
    result["reduced_decode_mosaics"] = reduced_decode_study(reference, paths, min_side)
    big = [s.path for s in samples if min(Image.open(s.path).size) >= 2 * min_side]
    result["reduced_decode_originals"] = reduced_decode_study(reference, big, min_side)

    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
