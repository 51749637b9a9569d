from __future__ import annotations

import dataclasses
import hashlib
import socket
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from timm.data import resolve_model_data_config

from dogbench import backbones
from dogbench.backbones import (
    ALIASES,
    Backbone,
    BackboneError,
    load_backbone,
    measure_gflops,
    resolve_model_name,
)
from dogbench.config import BackboneConfig

CNN = "test_resnet"  # tiny timm test models: a few hundred thousand parameters
VIT = "test_vit"


def _random(model: str = CNN, *, seed: int = 0, **fields: Any) -> Backbone:
    return load_backbone(BackboneConfig(label="b", model=model, weights="random", seed=seed, **fields))


def _from_file(path: Path, model: str = CNN, **fields: Any) -> Backbone:
    return load_backbone(BackboneConfig(label="b", model=model, weights=str(path), **fields))


def _outputs(backbone: Backbone) -> torch.Tensor:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return backbone.model(x)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def source() -> Backbone:
    """A random CNN whose weights the file tests write out and read back."""
    return _random(seed=3)


class Payload:
    """Not a tensor: torch.load(weights_only=True) must refuse to unpickle it."""

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.marker),))

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_aliases_resolve_to_registered_timm_tags(alias: str) -> None:
    tag = resolve_model_name(alias)
    assert tag == ALIASES[alias]
    arch, _, pretrained_tag = tag.partition(".")
    assert timm.is_model(arch)
    if pretrained_tag:
        assert tag in timm.list_pretrained(arch), f"{tag} is not a published timm weight"


def test_reference_aliases() -> None:
    assert resolve_model_name("vit_s16").startswith("vit_small_patch16_224.")
    assert resolve_model_name("resnet50").startswith("resnet50.")


@pytest.mark.parametrize("name", ["resnet50.a1_in1k", "vit_small_patch14_dinov2", CNN])
def test_timm_tags_pass_through(name: str) -> None:
    assert resolve_model_name(name) == name


def test_unknown_name_suggests_and_lists_aliases() -> None:
    with pytest.raises(BackboneError) as err:
        resolve_model_name("vit_s61")
    message = str(err.value)
    assert "'vit_s61'" in message and "Did you mean" in message
    for alias in ALIASES:
        assert alias in message
    with pytest.raises(BackboneError, match="Unknown backbone"):
        load_backbone(BackboneConfig(label="x", model="no_such_net_at_all", weights="random"))


def test_random_weights_depend_only_on_the_seed() -> None:
    state_before = torch.random.get_rng_state()
    a, b, c = _random(seed=0), _random(seed=0), _random(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state_before), "loading must not consume the global RNG"
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    assert torch.equal(_outputs(a), _outputs(b))
    assert not torch.allclose(_outputs(a), _outputs(c))


def test_loaded_model_is_frozen_headless_and_in_eval_mode() -> None:
    b = _random()
    assert not b.model.training
    assert all(not p.requires_grad for p in b.model.parameters())
    assert b.tag == CNN and b.weights == "random" and b.label == "b"
    assert _outputs(b).shape == (2, b.feature_dim)
    assert b.params == sum(p.numel() for p in b.model.parameters()) > 0
    assert not b.is_vit and _random(VIT, model_kwargs={"img_size": 32}).is_vit


def test_safetensors_file_reproduces_the_model(tmp_path: Path, source: Backbone) -> None:
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(source.model.state_dict(), str(path))
    loaded = _from_file(path)
    assert loaded.weights == str(path)
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(_outputs(loaded), _outputs(source))


@pytest.mark.parametrize(
    ("name", "wrap"),
    [
        ("plain.pt", lambda sd: sd),
        ("wrapped.pth", lambda sd: {"state_dict": sd, "epoch": 7}),
        ("ddp.bin", lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}}),
    ],
)
def test_torch_checkpoint_reproduces_the_model(tmp_path: Path, source: Backbone, name: str, wrap: Any) -> None:
    path = tmp_path / name
    torch.save(wrap(source.model.state_dict()), path)
    loaded = _from_file(path)
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(_outputs(loaded), _outputs(source))


def test_vit_from_file_with_img_size(tmp_path: Path) -> None:
    vit = _random(VIT, seed=2, model_kwargs={"img_size": 32})
    path = tmp_path / "vit.safetensors"
    safetensors.torch.save_file(vit.model.state_dict(), str(path))
    loaded = _from_file(path, VIT, model_kwargs={"img_size": 32})
    assert torch.equal(_outputs(loaded), _outputs(vit))


def test_pickled_objects_are_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"x": Payload(marker)}, path)
    with pytest.raises(BackboneError, match="weights_only") as err:
        _from_file(path)
    assert str(path) in str(err.value)
    assert not marker.exists(), "unpickling ran the payload"


def test_checkpoint_without_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(BackboneError, match="state dict of tensors") as err:
        _from_file(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("name", ["corrupt.safetensors", "corrupt.pt"])
def test_corrupt_file_names_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(BackboneError, match="Cannot read weights file") as err:
        _from_file(path)
    assert str(path) in str(err.value)


def test_weights_of_a_differently_shaped_model_name_the_file(tmp_path: Path) -> None:
    other = _random("resnet10t")  # same key names as test_resnet, other shapes
    path = tmp_path / "resnet10t.safetensors"
    safetensors.torch.save_file(other.model.state_dict(), str(path))
    with pytest.raises(BackboneError, match="does not fit model") as err:
        _from_file(path)
    assert str(path) in str(err.value) and CNN in str(err.value)
    assert "shape mismatches (conv1.0.weight: file [24, 3, 3, 3], model [16, 3, 3, 3]" in str(err.value)


def test_weights_of_another_architecture_name_the_file(tmp_path: Path) -> None:
    vit = _random(VIT, model_kwargs={"img_size": 32})  # no key in common with test_resnet
    path = tmp_path / "vit.safetensors"
    safetensors.torch.save_file(vit.model.state_dict(), str(path))
    with pytest.raises(BackboneError) as err:
        _from_file(path)
    assert str(path) in str(err.value)
    assert "missing keys (conv1.0.weight," in str(err.value) and "unexpected keys (blocks.0." in str(err.value)
    assert "another architecture?" in str(err.value) and len(str(err.value)) < 800  # counted, not listed


def test_missing_file_and_unknown_weights_list_the_choices(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="does not exist") as err:
        _from_file(tmp_path / "absent.safetensors")
    assert "random" in str(err.value) and "hub" in str(err.value)
    with pytest.raises(BackboneError, match="Unknown weights 'hbu'") as err:
        load_backbone(BackboneConfig(label="b", model=CNN, weights="hbu"))
    assert "hub" in str(err.value) and "random" in str(err.value)


def test_bad_model_kwargs(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="Bad model keyword arguments"):
        _random(model_kwargs={"no_such_kwarg": 1})


def test_hub_offline_suggests_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    create = timm.create_model
    calls: list[bool] = []

    def offline(name: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        calls.append(pretrained)
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return create(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr(backbones, "hub_unreachable", lambda tag: None)  # as if the hub resolved
    with pytest.raises(BackboneError) as err:
        load_backbone(BackboneConfig(label="vit", model="vit_s16"))
    message = str(err.value)
    assert ALIASES["vit_s16"] in message and "Offline?" in message
    assert "local" in message and ".safetensors" in message and '"random"' in message
    assert calls == [True]


def test_unresolvable_hub_fails_before_timm_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args: Any, **kwargs: Any) -> None:
        raise OSError("Name or service not known")

    def must_not_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("timm.create_model called although the hub cannot be reached")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(timm, "create_model", must_not_run)
    with pytest.raises(BackboneError, match="not in the local Hugging Face cache and huggingface.co cannot be "
                       "resolved") as err:
        load_backbone(BackboneConfig(label="r", model="resnet50"))
    assert "Offline?" in str(err.value) and "resnet50.tv_in1k" in str(err.value)


def test_cached_hub_weights_need_no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub

    cached = tmp_path / "model.safetensors"
    cached.write_bytes(b"")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: str(cached))
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    assert backbones.hub_unreachable("resnet50.tv_in1k") is None


def test_preprocessing_comes_from_the_model() -> None:
    b = _random()
    cfg = resolve_model_data_config(b.model)
    p = b.preprocess
    assert p.input_size == tuple(cfg["input_size"])
    assert (p.interpolation, p.crop_pct, p.crop_mode) == (cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"])
    assert p.mean == pytest.approx(cfg["mean"]) and p.std == pytest.approx(cfg["std"])
    # A ViT and a ResNet from timm disagree on something, so the key would tell them apart.
    other = _random("resnet10t").preprocess
    assert dataclasses.astuple(other) != dataclasses.astuple(p)


def test_img_size_kwarg_sets_the_input_size() -> None:
    vit = _random(VIT, model_kwargs={"img_size": 32})
    assert vit.preprocess.input_size == (3, 32, 32)
    assert vit.model_kwargs == {"img_size": 32}
    image = Image.new("RGB", (50, 40), (10, 200, 30))
    assert vit.preprocess.transform()(image).shape == (3, 32, 32)


def test_img_size_pair_sets_the_input_size() -> None:
    vit = _random(VIT, model_kwargs={"img_size": [32, 32]})
    assert vit.preprocess.input_size == (3, 32, 32)


def test_preprocessing_overrides_apply() -> None:
    base = _random().preprocess
    p = _random(
        input_size=40, crop_pct=0.5, interpolation="nearest", mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0)
    ).preprocess
    assert p.input_size == (3, 40, 40)
    assert p.crop_pct == 0.5 and p.crop_mode == base.crop_mode
    assert p.interpolation == "nearest"
    assert p.mean == (0.1, 0.2, 0.3) and p.std == (1.0, 1.0, 1.0)
    d = p.to_dict()
    assert d["input_size"] == [3, 40, 40] and d["mean"] == [0.1, 0.2, 0.3]
    assert p.transform()(Image.new("RGB", (64, 48))).shape == (3, 40, 40)


def test_crop_pct_changes_the_transform_output() -> None:
    rng = torch.Generator().manual_seed(0)
    pixels = (torch.rand(48, 64, 3, generator=rng) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    wide = _random(input_size=32, crop_pct=1.0).preprocess.transform()(image)
    tight = _random(input_size=32, crop_pct=0.5).preprocess.transform()(image)
    assert wide.shape == tight.shape == (3, 32, 32)
    assert not torch.allclose(wide, tight)


@pytest.mark.parametrize("model", [CNN, "resnet10t"])
def test_gflops_scale_with_input_area(model: str) -> None:
    small = measure_gflops(_random(model, input_size=32))
    large = measure_gflops(_random(model, input_size=64))
    assert small > 0
    assert 3.5 < large / small < 4.5


def test_gflops_of_a_vit_grow_with_tokens() -> None:
    small = measure_gflops(_random(VIT, model_kwargs={"img_size": 32}))
    large = measure_gflops(_random(VIT, model_kwargs={"img_size": 64}))
    assert 0 < small and 3.0 < large / small < 6.0  # 4 -> 16 patches: linear parts x~4, attention more


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_uint8_transform_then_normalize_equals_timms_float_transform(interpolation: str) -> None:
    pre = _random(input_size=40, crop_pct=0.875, interpolation=interpolation).preprocess
    rng = torch.Generator().manual_seed(1)
    image = Image.fromarray((torch.rand(53, 71, 3, generator=rng) * 255).to(torch.uint8).numpy())
    as_bytes = pre.transform(uint8=True)(image)
    assert as_bytes.dtype == torch.uint8 and as_bytes.shape == (3, 40, 40)
    # Bitwise: batches normalised on the device give exactly the features of timm's own transform.
    assert torch.equal(pre.normalize(as_bytes.unsqueeze(0))[0], pre.transform()(image))


def test_min_side_is_the_resize_target() -> None:
    assert _random(input_size=224, crop_pct=0.875).preprocess.min_side == 256
    assert _random(input_size=224, crop_pct=1.0).preprocess.min_side == 224
    assert _random(input_size=(3, 32, 48), crop_pct=0.5).preprocess.min_side == 96


@pytest.mark.parametrize("crop_mode", ["center", "squash"])
def test_tensor_transform_matches_timms_pil_transform_within_rounding(crop_mode: str) -> None:
    pre = _random(input_size=40, crop_pct=0.875, interpolation="bicubic", crop_mode=crop_mode).preprocess
    rng = torch.Generator().manual_seed(2)
    pixels = (torch.rand(61, 83, 3, generator=rng) * 255).to(torch.uint8)
    tensor_out = pre.tensor_transform()(pixels.permute(2, 0, 1).contiguous())
    pil_out = pre.transform(uint8=True)(Image.fromarray(pixels.numpy()))
    assert tensor_out.dtype == torch.uint8 and tensor_out.shape == pil_out.shape == (3, 40, 40)
    assert (tensor_out.int() - pil_out.int()).abs().float().mean() < 1.5


def test_tensor_transform_is_none_where_only_pil_matches_timm() -> None:
    assert _random(input_size=40, crop_mode="border").preprocess.tensor_transform() is None
    assert _random(input_size=40, interpolation="lanczos").preprocess.tensor_transform() is None
    assert _random(input_size=(3, 32, 48), crop_mode="center").preprocess.tensor_transform() is None


@pytest.mark.parametrize(
    ("tag", "weights", "imagenet", "needle"),
    [
        ("vit_small_patch16_224.augreg_in21k_ft_in1k", "hub", True, "ImageNet-21k, ImageNet-1k"),
        ("resnet50.tv_in1k", "hub", True, "tv_in1k: ImageNet-1k"),
        ("vit_small_patch14_dinov2", "w.safetensors", True, "LVD-142M"),  # timm's default tag, assumed
        ("vit_base_patch16_clip_224.laion2b", "hub", False, "names no ImageNet-family data"),
        ("vit_base_patch16_224.dino", "hub", True, "DINO, self-supervised"),
        ("vit_base_patch16_224.mae", "hub", True, "MAE, self-supervised"),
        ("resnet50", "random", False, "random initialisation"),
    ],
)
def test_pretraining_is_read_from_the_timm_tag(tag: str, weights: str, imagenet: bool, needle: str) -> None:
    from dogbench.backbones import pretraining_of

    pre = pretraining_of(tag, weights)
    assert pre.imagenet is imagenet
    assert needle in pre.describe()
    assert ("assumed from the timm tag" in pre.describe()) is (weights not in ("hub", "random"))
