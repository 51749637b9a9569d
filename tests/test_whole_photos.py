"""Full-size photos through dogbench equal timm's own PIL eval pipeline (integration: ../shared).

The reference is timm alone: ``Image.open(path).convert("RGB")``, ``create_transform(**resolve_data_config(model))``
(eval), the model in fp32 on CPU. dogbench's features come through ``ImageDataset`` and ``ModelRunner``, the one
path that extraction and ``predict`` use. Tolerances were measured on all 80 originals with
``benchmarks/whole_photos.py`` (docs/results/whole-photos.md):

- decoder "pil", no reduced decoding: relative L2 difference <= 1.3e-6 (timm's pixels; the float order of a
  channels_last forward pass): asserted < 1e-5.
- defaults (decoder "auto", reduced decoding on): <= 5.2e-3 relative L2 (7.2e-3 for box crops), cosine >=
  0.99997 (libjpeg-turbo + torchvision's uint8 resize, within a grey level of PIL's); no original is large
  enough for reduced decoding: asserted relative L2 < 0.02 and cosine > 0.9995.
- reduced decoding of a larger JPEG (3x3 tiles of an original): relative L2 0.044 and 0.053 on the two tiled
  photos below (0.119 and 0.187 before the decode kept twice the resize target): asserted < 0.08.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from conftest import shared_dir
from dogbench.backbones import Backbone, load_backbone
from dogbench.config import BackboneConfig, Precision
from dogbench.data import Sample, load_image, open_dataset
from dogbench.data.images import REDUCING_GAP
from dogbench.device import Policy
from dogbench.features import ImageDataset, ModelRunner

SHARED = shared_dir()
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
ORIGINALS = SHARED / "data" / "stanford-dogs-originals"
# the two largest originals (555x513 and 800x1147: the ones reduced decoding used to shrink) and 8 more
LARGEST = ("n02099601_6331.jpg", "n02099601_6867.jpg")
TILED = ("n02109525_12875.jpg", "n02109525_11452.jpg")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (SHARED / "data").exists() or not WEIGHTS.is_file(),
                       reason="../shared/data or the EfficientNet-Lite0 weights are absent"),
]


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return load_backbone(BackboneConfig(label="cnn", model="tf_efficientnet_lite0", weights=str(WEIGHTS)))


@pytest.fixture(scope="module")
def runner(backbone: Backbone) -> ModelRunner:
    return ModelRunner.create(backbone, policy=Policy.resolve("cpu", Precision.FP32))


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    """timm alone, as ../shared/README.md loads it: no dogbench code involved."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay={"file": str(WEIGHTS)})
    return model.eval()


@pytest.fixture(scope="module")
def samples() -> tuple[Sample, ...]:
    every = open_dataset(ORIGINALS).samples
    chosen = [s for s in every if s.path.name in LARGEST] + list(every[::10])
    return tuple(dict.fromkeys(chosen))  # 10 photos, 3 breeds or more, both large ones


def timm_features(model: torch.nn.Module, images: list[Image.Image]) -> np.ndarray:
    transform = create_transform(**resolve_data_config(model=model))
    with torch.inference_mode():
        return model(torch.stack([transform(im) for im in images])).numpy()


def dogbench_features(runner: ModelRunner, backbone: Backbone, samples: tuple[Sample, ...], **kw) -> np.ndarray:
    images = ImageDataset.for_preprocess(samples, backbone.preprocess, **kw)
    items = [images[i] for i in range(len(images))]
    assert [err for _, _, err in items] == [""] * len(items)
    return runner(torch.stack([x for x, _, _ in items]))


def relative_l2(a: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - ref, axis=1) / np.linalg.norm(ref, axis=1)


def cosine(a: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return (a * ref).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(ref, axis=1))


def test_the_photos_are_full_size_and_the_preprocessing_is_timms(samples, backbone, reference) -> None:
    sizes = [Image.open(s.path).size for s in samples]
    assert len(samples) == 10 and len({s.label for s in samples}) >= 3
    assert sum(w != h for w, h in sizes) >= 8 and max(min(size) for size in sizes) >= 2 * backbone.preprocess.min_side
    timm_cfg = resolve_data_config(model=reference)
    assert backbone.preprocess.to_dict() == {k: list(v) if isinstance(v, tuple) else v for k, v in timm_cfg.items()}


def _photos(samples, *, crop_to_box: bool) -> list[Image.Image]:
    """The photos as PIL opens them (RGB), cropped to their first box when asked: the reference's input."""
    photos = [Image.open(s.path).convert("RGB") for s in samples]
    return [im.crop(s.box) for im, s in zip(photos, samples, strict=True)] if crop_to_box else photos


@pytest.mark.parametrize("crop_to_box", [False, True], ids=["whole", "box"])
def test_pil_decoder_without_reduced_decoding_is_timms_pipeline(samples, backbone, runner, reference,
                                                                 crop_to_box: bool) -> None:
    ref = timm_features(reference, _photos(samples, crop_to_box=crop_to_box))
    ours = dogbench_features(runner, backbone, samples, crop_to_box=crop_to_box, decoder="pil", reduced_decode=False)
    assert relative_l2(ours, ref).max() < 1e-5
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("crop_to_box", [False, True], ids=["whole", "box"])
def test_default_decoding_is_within_rounding_of_timms_pipeline(samples, backbone, runner, reference,
                                                               crop_to_box: bool) -> None:
    ref = timm_features(reference, _photos(samples, crop_to_box=crop_to_box))
    ours = dogbench_features(runner, backbone, samples, crop_to_box=crop_to_box, decoder="auto", reduced_decode=True)
    assert relative_l2(ours, ref).max() < 0.02
    assert cosine(ours, ref).min() > 0.9995


def _tiled(sample: Sample, folder: Path, n: int = 3) -> Path:
    """A JPEG of n x n copies of an original: real photo detail at a size where reduced decoding applies."""
    with Image.open(sample.path) as im:
        tile = im.convert("RGB")
    canvas = Image.new("RGB", (n * tile.width, n * tile.height))
    for i in range(n * n):
        canvas.paste(tile, ((i % n) * tile.width, (i // n) * tile.height))
    path = folder / sample.path.name
    canvas.save(path, quality=95)
    return path


def test_reduced_decoding_keeps_twice_the_resize_target(backbone, runner, reference, tmp_path: Path) -> None:
    every = {s.path.name: s for s in open_dataset(ORIGINALS).samples}
    paths = [_tiled(every[name], tmp_path) for name in TILED]
    min_side = backbone.preprocess.min_side
    for path in paths:
        full, reduced = Image.open(path).size, load_image(path, min_side=min_side).size
        assert reduced[0] < full[0] and min(reduced) >= REDUCING_GAP * min_side
    ref = timm_features(reference, [Image.open(p).convert("RGB") for p in paths])
    tiles = tuple(Sample(p, p.name, 0, "test") for p in paths)
    ours = dogbench_features(runner, backbone, tiles, crop_to_box=False, decoder="auto", reduced_decode=True)
    exact = dogbench_features(runner, backbone, tiles, crop_to_box=False, decoder="auto", reduced_decode=False)
    assert relative_l2(exact, ref).max() < 0.02  # without reduced decoding: the tensor decoder's rounding
    assert relative_l2(ours, ref).max() < 0.08
    assert cosine(ours, ref).min() > 0.995
