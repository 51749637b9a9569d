"""Model names as readers meet them (issue 27): titles from timm tags, and a run's model entry named in full."""

from __future__ import annotations

import pytest

from dogbench.names import architecture_title, datasets_of_tag, model_name


@pytest.mark.parametrize(("tag", "title"), [
    ("vit_small_patch14_dinov2.lvd142m", "DINOv2 ViT-S/14"),
    ("vit_small_patch16_224.augreg_in21k_ft_in1k", "ViT-S/16"),
    ("vit_base_patch14_reg4_dinov2", "DINOv2 ViT-B/14 with registers"),
    ("vit_huge_patch14_224.orig_in21k", "ViT-H/14"),
    ("tf_efficientnet_lite0", "EfficientNet-Lite0"),
    ("efficientnet_b3.ra2_in1k", "EfficientNet-B3"),
    ("tf_efficientnetv2_s", "EfficientNetV2-S"),
    ("mobilenetv2_100", "MobileNetV2 (1.00x)"),
    ("mobilenetv3_large_100", "MobileNetV3-Large (1.00x)"),
    ("resnet50.tv_in1k", "ResNet-50"),
    ("resnet50d", "ResNet-50d"),
    ("convnext_tiny", "ConvNeXt-T"),
    ("deit_small_patch16_224", "DeiT-S/16"),
    ("some_new_net_42.x", "some_new_net_42"),
])
def test_architecture_titles(tag: str, title: str) -> None:
    assert architecture_title(tag) == title


def test_datasets_of_a_pretrained_tag_in_order_once() -> None:
    assert datasets_of_tag("augreg_in21k_ft_in1k") == ("ImageNet-21k", "ImageNet-1k")
    assert datasets_of_tag("in1k_ft_in1k") == ("ImageNet-1k",)
    assert datasets_of_tag("laion2b") == ()


def test_a_run_entry_is_named_by_its_description_data_and_weights() -> None:
    entry = {"label": "vit", "backbone": "vit_small_patch14_dinov2",
             "weights": "/data/w/vit_small_patch14_dinov2.imgfocus.fp16.safetensors",
             "pretraining": "lvd142m: LVD-142M (curated around ImageNet-1k/22k) (assumed from the timm tag: ...)",
             "description": "saliency-tuned DINOv2 ViT-S/14"}
    name = model_name(entry)
    assert name.short == "saliency-tuned DINOv2 ViT-S/14 (LVD-142M)"  # no nested brackets (issue 27)
    assert name.in_sentence == "saliency-tuned DINOv2 ViT-S/14 pretrained on LVD-142M (vit)"
    assert name.full == ("vit is saliency-tuned DINOv2 ViT-S/14 (timm vit_small_patch14_dinov2), pretrained on "
                         "LVD-142M (curated around ImageNet-1k/22k), weights from a local file "
                         "(vit_small_patch14_dinov2.imgfocus.fp16.safetensors)")
    old = model_name({"label": "cnn", "backbone": "tf_efficientnet_lite0", "weights": "hub",
                      "pretraining": "in1k: ImageNet-1k"})
    assert old.short == "EfficientNet-Lite0 (ImageNet-1k)" and old.weights == "timm's hub"
    random = model_name({"label": "r", "backbone": "resnet50", "weights": "random", "pretraining": "random init"})
    assert random.short == "ResNet-50" and random.weights == "random initialisation"
    assert random.in_sentence == "ResNet-50 with random weights (r)"
    dino = model_name({"label": "d", "backbone": "vit_base_patch16_224.dino"})  # "ImageNet-1k (DINO, ...)"
    assert dino.short == "ViT-B/16 (ImageNet-1k)" and "ImageNet-1k (DINO, self-supervised)" in dino.full
