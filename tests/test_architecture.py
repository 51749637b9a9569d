from __future__ import annotations

import csv
import io
import json
import resource
import sys

import pytest
import torch

from dogbench import architecture
from dogbench.architecture import (
    DEFAULT_MODELS,
    PAPER_TABLE1,
    Architecture,
    Family,
    describe,
    meta_model,
    models_command,
    rows,
    variants_table,
)
from dogbench.backbones import ALIASES, BackboneError

# timm's own parameter counts with a 1000-class head (its model cards: 86.6M, 304.3M, 632.0M); the paper rounds
# them to 86M, 307M and 632M (its ViT-L figure counts a slightly different model).
TIMM_PARAMS_M = {"vit_b16": 86.6, "vit_l16": 304.3, "vit_h14": 632.0}


@pytest.fixture(scope="module")
def default_archs() -> dict[str, Architecture]:
    return {name: describe(name) for name in DEFAULT_MODELS}


@pytest.mark.parametrize("alias", sorted(TIMM_PARAMS_M))
def test_paper_rows_are_reproduced(default_archs: dict[str, Architecture], alias: str) -> None:
    a = default_archs[alias]
    row = PAPER_TABLE1[a.arch]
    assert a.family is Family.VIT
    assert (a.layers, a.hidden_size, a.mlp_size, a.heads) == (row.layers, row.hidden_size, row.mlp_size, row.heads)
    assert a.matches_paper is True
    assert round(a.params / 1e6, 1) == TIMM_PARAMS_M[alias]
    assert abs(a.params / 1e6 - row.params_m) / row.params_m < 0.015  # beside the paper's rounded figure
    assert a.patch_size == ((14, 14) if alias == "vit_h14" else (16, 16))
    assert a.image_size == (224, 224)
    assert a.stages is None


def test_paper_table_is_the_papers() -> None:
    assert {k: (r.name, r.layers, r.hidden_size, r.mlp_size, r.heads, r.params_m) for k, r in PAPER_TABLE1.items()} == {
        "vit_base_patch16_224": ("ViT-Base", 12, 768, 3072, 12, 86),
        "vit_large_patch16_224": ("ViT-Large", 24, 1024, 4096, 16, 307),
        "vit_huge_patch14_224": ("ViT-Huge", 32, 1280, 5120, 16, 632),
    }


def test_resnet50_row(default_archs: dict[str, Architecture]) -> None:
    a = default_archs["resnet50"]
    assert a.tag == ALIASES["resnet50"]
    assert a.family is Family.CNN
    assert a.stages == (3, 4, 6, 3)
    assert a.layers == 16  # bottleneck blocks; 16 x 3 convs + stem + fc = the "50"
    assert a.hidden_size == 2048
    assert (a.mlp_size, a.heads, a.patch_size) == (None, None, None)
    assert round(a.params / 1e6, 1) == 25.6
    assert a.paper is None and a.matches_paper is None


def test_vit_s16_is_not_in_the_paper(default_archs: dict[str, Architecture]) -> None:
    a = default_archs["vit_s16"]
    assert (a.layers, a.hidden_size, a.mlp_size, a.heads) == (12, 384, 1536, 6)
    assert a.paper is None and a.matches_paper is None


def test_num_classes_counts_the_head() -> None:
    with_head, without = describe("vit_b16"), describe("vit_b16", num_classes=0)
    assert with_head.params - without.params == 768 * 1000 + 1000
    assert without.num_classes == 0


def test_timm_tags_with_and_without_pretrained_tag() -> None:
    bare = describe("vit_base_patch16_224")
    tagged = describe("vit_base_patch16_224.augreg2_in21k_ft_in1k")
    assert (bare.tag, tagged.tag) == ("vit_base_patch16_224", "vit_base_patch16_224.augreg2_in21k_ft_in1k")
    assert _shape(bare) == _shape(tagged)
    assert bare.matches_paper and tagged.matches_paper


def _shape(a: Architecture) -> tuple:
    return a.layers, a.hidden_size, a.mlp_size, a.heads, a.patch_size, a.params


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_every_alias_describes(alias: str) -> None:
    a = describe(alias)
    assert a.tag == ALIASES[alias] and a.name == alias
    assert a.params > 1_000_000 and a.hidden_size > 0 and a.layers
    assert (a.family is Family.VIT) == alias.startswith(("vit", "dinov2"))


def test_other_families() -> None:
    lite0 = describe("efficientnet_lite0")
    assert lite0.family is Family.CNN and lite0.stages == (1, 2, 2, 3, 3, 4, 1) and lite0.layers == 16
    swin = describe("swin_tiny_patch4_window7_224")
    assert swin.family is Family.OTHER and swin.stages == (2, 2, 6, 2) and swin.patch_size == (4, 4)
    hybrid = describe("vit_tiny_r_s16_p8_224")  # a ResNet stem, then 8x8 patches of its map: 7x7 tokens at 224
    assert hybrid.family is Family.VIT and hybrid.patch_size == (32, 32) and hybrid.matches_paper is None


def test_built_on_the_meta_device_without_memory() -> None:
    model = meta_model("vit_huge_patch14_224")
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
    del model
    peak_before = _peak_rss_mb()
    a = architecture._describe.__wrapped__("vit_h14", 1000)  # uncached; 2.5 GB of float32 if it were materialised
    assert _peak_rss_mb() - peak_before < 200
    assert a.params > 600e6
    assert not torch.cuda.is_initialized()


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(BackboneError, match=r"Unknown backbone 'vit_bsae_patch16_224'.*Did you mean.*Known aliases: "
                       r"vit_s16, vit_b16"):
        describe("vit_bsae_patch16_224")
    with pytest.raises(BackboneError, match=r"Unknown pretrained tag.*Known tags of 'vit_base_patch16_224':.*augreg"):
        describe("vit_base_patch16_224.no_such_tag")


def test_table_shows_the_paper_beside_the_models() -> None:
    text = variants_table()
    header, _, *lines = text.splitlines()
    assert header.split("  ")[0].strip() == "model" and "= paper" in header
    by_model = {line.split()[0]: line.split() for line in lines[:5]}
    assert list(by_model) == list(DEFAULT_MODELS)
    assert by_model["vit_b16"][-3:] == ["86.6", "86", "yes"]
    assert by_model["vit_l16"][-3:] == ["304.3", "307", "yes"]
    assert by_model["vit_h14"][-3:] == ["632.0", "632", "yes"]
    assert by_model["vit_h14"][2:7] == ["32", "1280", "5120", "16", "14"]
    assert by_model["resnet50"][2:5] == ["16", "(3-4-6-3)", "2048"] and by_model["resnet50"][-1] == "25.6"
    assert by_model["vit_s16"][-1] == "22.1"
    assert "Table 1" in text and "vit_h14 = ViT-Huge" in text


def test_models_command_defaults_and_json() -> None:
    assert models_command([]) == variants_table(DEFAULT_MODELS)
    doc = json.loads(models_command(["vit_b16", "resnet50"], as_json=True))
    assert [d["name"] for d in doc] == ["vit_b16", "resnet50"]
    assert doc[0] | {"params": 0} == {
        "name": "vit_b16", "tag": ALIASES["vit_b16"], "family": "vit", "layers": 12, "stages": None,
        "hidden_size": 768, "mlp_size": 3072, "heads": 12, "patch_size": [16, 16], "image_size": [224, 224],
        "num_classes": 1000, "params": 0, "params_m": 86.6, "paper_name": "ViT-Base", "paper_params_m": 86,
        "matches_paper": True,
    }
    assert doc[1]["stages"] == [3, 4, 6, 3] and doc[1]["matches_paper"] is None


def test_rows_write_as_csv() -> None:
    table = rows(["resnet50"])
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    assert out.getvalue().splitlines()[1].startswith("resnet50,resnet50.tv_in1k,cnn,16,")


def test_a_loaded_model_is_described_with_its_own_kwargs() -> None:
    import timm

    from dogbench.architecture import describe_model

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64)
    arch = describe_model(model, name="t", tag="vit_tiny_patch16_224")
    assert (arch.layers, arch.hidden_size, arch.mlp_size, arch.heads) == (12, 192, 768, 3)
    assert arch.image_size == (64, 64) and arch.patch_size == (16, 16) and arch.num_classes == 0
    assert arch.params == sum(p.numel() for p in model.parameters())
