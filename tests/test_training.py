"""Fine-tuning on tiny synthetic images with small random timm models: every method trains, a fixed batch is
overfitted, layer-decay scales are the known values, LoRA leaves base weights bitwise unchanged, and a SIGKILL
mid-epoch then the same command ends with weights bitwise equal to an uninterrupted run's (CPU)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from dogbench.config import BackboneConfig, FinetuneConfig, Precision
from dogbench.data import Sample
from dogbench.device import Policy
from dogbench.rundir import BEST_EPOCH_FILE, TRAIN_PARAMS_FILE
from dogbench.rundir import TRAIN_STATE_FILE as STATE_FILE
from dogbench.training import (
    Stepper,
    TrainData,
    TrainFiles,
    TrainingError,
    base_name,
    build_trainable,
    export,
    load_for_training,
    lr_factor,
    param_groups,
    resolve_params,
    set_train_mode,
    train,
)

# validation's precision: features.precision auto on the CPU, as the predictor resolves it; steps in fp32
POLICY = Policy(torch.device("cpu"), Precision.FP32, Precision.FP32)
TINY = {
    "vit": BackboneConfig(label="vit", model="test_vit", weights="random", model_kwargs={"img_size": 32}),
    "cnn": BackboneConfig(label="cnn", model="test_resnet", weights="random", input_size=(3, 32, 32)),
}
METHODS = ("lora", "partial", "full", "lp-ft")


def make_data(root: Path, *, n_classes: int = 3, per_class: int = 8) -> TrainData:
    """Half of each class for training, half for validation: tiny JPEGs whose colour says the class."""
    from conftest import class_image

    rng = np.random.default_rng(0)
    train, val = [], []
    root.mkdir(parents=True, exist_ok=True)
    for c in range(n_classes):
        for i in range(per_class):
            path = root / f"c{c}_{i}.jpg"
            class_image(c, size=(40, 36), rng=rng).save(path)
            (train if i % 2 == 0 else val).append(Sample(path, path.stem, c, "train", None))
    return TrainData(tuple(train), np.array([s.label for s in train]), tuple(val), np.array([s.label for s in val]),
                     n_classes)


def train_files(folder: Path) -> TrainFiles:
    """A training's files in ``folder``, by the run folder's names (as protocols.finetune names them)."""
    return TrainFiles(state=folder / STATE_FILE, params=folder / TRAIN_PARAMS_FILE,
                      best_template=folder / BEST_EPOCH_FILE)


def params_for(method: str, kind: str, **changes: object):
    cfg = FinetuneConfig(epochs=1, batch_size=4, precision=Precision.FP32)
    return dataclasses.replace(resolve_params(cfg, method, is_vit=kind == "vit", policy=POLICY), **changes)


def probe_init(backbone, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((n_classes, backbone.feature_dim), np.float32), np.zeros(n_classes, np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TrainData:
    return make_data(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("kind", ["vit", "cnn"])
@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_an_epoch(method: str, kind: str, data: TrainData, tmp_path: Path) -> None:
    params = params_for(method, kind)
    backbone = load_for_training(TINY[kind], params)
    t = build_trainable(backbone, data.n_classes, params,
                        head_init=probe_init(backbone, data.n_classes) if method == "lp-ft" else None)
    out = train(t, backbone, data, params, train_files(tmp_path), policy=POLICY, progress=False)
    assert out.epochs_run == 1 and len(out.history) == 1
    assert np.isfinite(out.history[0]["train_loss"]) and 0 <= out.best_val_top1 <= 1
    assert out.train_images == (len(data.train) // 4) * 4 and out.images_per_s > 0
    assert out.best_path == tmp_path / f"best-epoch{out.best_epoch}.safetensors" and out.best_path.is_file()
    assert (tmp_path / STATE_FILE).is_file() and len(list(tmp_path.glob("best-epoch*.safetensors"))) == 1
    fraction = out.trainable_params / out.total_params
    if method in ("full", "lp-ft"):
        assert out.trainable_params == out.total_params
    else:
        assert 0 < fraction < 1
    if method == "partial":  # the last 2 blocks (ViT: of 6, with the final norm) or stages (ResNet: of 4)
        trained = {n.split(".")[1] + "." + n.split(".")[2] if kind == "vit" else n.split(".")[1]
                   for n, p in t.model.named_parameters() if p.requires_grad and not n.startswith("head.")}
        assert trained == ({"blocks.4", "blocks.5", "norm.weight", "norm.bias"} if kind == "vit" else
                           {"layer3", "layer4"}), trained


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_a_fixed_batch_is_overfitted(kind: str) -> None:
    params = params_for("full", kind, lr=1e-3, label_smoothing=0.0, drop_path=0.0, warmup_epochs=0.0)
    backbone = load_for_training(TINY[kind], params)
    t = build_trainable(backbone, 4, params)
    stepper = Stepper(t, backbone.preprocess, params, policy=POLICY, n_classes=4, total_steps=1000, steps_per_epoch=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(8) % 4
    set_train_mode(t.model, freeze_bn_stats=params.freeze_bn_stats)
    losses = []
    for step in range(40):
        losses.append(stepper.forward_backward(x, y))
        stepper.optimizer_step(step)
    assert losses[-1] < 0.2 * losses[0], losses


def test_layer_decay_scales_equal_known_values() -> None:
    """A 2-block ViT, decay 0.5, timm's groups (stem; block 0; block 1 with the final norm): stem 0.5^2, block 0
    0.5, block 1 and the final norm 1, head head_lr_scale; with LoRA the adapters take their block's scale
    (timm #2691: frozen parameters must not shift them)."""
    cfg = dataclasses.replace(TINY["vit"], model_kwargs={"img_size": 32, "depth": 2})
    expected = {"patch_embed.proj.weight": 0.25, "cls_token": 0.25, "pos_embed": 0.25,
                "blocks.0.attn.qkv.weight": 0.5, "blocks.1.mlp.fc2.bias": 1.0, "norm.weight": 1.0}
    for method in ("full", "lora"):
        params = params_for(method, "vit", layer_decay=0.5, head_lr_scale=10.0, lr=1e-3, drop_path=0.0)
        backbone = load_for_training(cfg, params)
        t = build_trainable(backbone, 3, params)
        scale = {name: g["lr_scale"] for g in param_groups(t, params) for name in g["names"]}
        lr = {name: g["lr"] for g in param_groups(t, params) for name in g["names"]}
        assert scale["head.weight"] == scale["head.bias"] == 10.0
        if method == "full":
            for name, value in expected.items():
                assert scale[f"backbone.{name}"] == value, name
            assert lr["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(1e-3 * 0.5)
            # timm's own layer-decay groups give the same scales on the unwrapped model
            from timm.optim import param_groups_layer_decay

            timm_scale = {}
            names = {id(p): n for n, p in backbone.model.named_parameters()}
            for g in param_groups_layer_decay(backbone.model, layer_decay=0.5):
                timm_scale.update({names[id(p)]: g["lr_scale"] for p in g["params"]})
            assert {n: scale[f"backbone.{n}"] for n in timm_scale} == pytest.approx(timm_scale)
        else:
            adapters = {base_name(n): s for n, s in scale.items() if "lora_" in n}
            assert adapters["blocks.0.attn.qkv.weight"] == 0.5 and adapters["blocks.1.mlp.fc2.weight"] == 1.0
            assert set(scale) == {n for n, p in t.model.named_parameters() if p.requires_grad}
            assert all("lora_" in n or n.startswith("head.") for n in scale)


def test_the_schedule_warms_up_then_follows_a_cosine() -> None:
    f = [lr_factor(s, total=10, warmup=2, min_ratio=0.1) for s in range(11)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0
    assert f[10] == pytest.approx(0.1) and f[6] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(f[2:], f[3:], strict=False))


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_lora_trains_only_adapters_and_head_and_leaves_base_weights_bitwise_unchanged(
    kind: str, data: TrainData, tmp_path: Path
) -> None:
    params = params_for("lora", kind, epochs=2)
    backbone = load_for_training(TINY[kind], params)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}  # weights and batch-norm buffers
    t = build_trainable(backbone, data.n_classes, params)
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    head0 = t.model.head.weight.detach().clone()
    train(t, backbone, data, params, train_files(tmp_path), policy=POLICY, progress=False)
    after = {base_name(k): v for k, v in t.model.backbone.state_dict().items() if "lora_" not in k}
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], changed
    lora_b = [p for n, p in t.model.named_parameters() if "lora_B" in n]
    assert any(bool(p.abs().sum() > 0) for p in lora_b)  # the adapters (B starts at zero) did train
    assert not torch.equal(head0, t.model.head.weight)
    merged, _, adapter = export(t)  # the merged weights differ exactly where adapters sit
    assert adapter and set(merged) == set(before)
    assert any(not torch.equal(merged[k], before[k]) for k in merged)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_training import POLICY, TINY, make_data, params_for, train_files
    from dogbench.training import build_trainable, load_for_training, train
    images, out, kill_at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    data = make_data(images)
    params = params_for("full", "vit", epochs=2, drop_path=0.2, color_jitter=0.4, **{recipe!r})
    backbone = load_for_training(TINY["vit"], params)
    t = build_trainable(backbone, data.n_classes, params)
    def on_step(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    outcome = train(t, backbone, data, params, train_files(out), policy=POLICY, checkpoint_every=2, progress=False,
                    on_step=on_step)
    print("resumed" if outcome.resumed else "fresh", outcome.epochs_run)
""")


def test_sigkill_mid_epoch_then_the_same_command_gives_bitwise_equal_weights(tmp_path: Path) -> None:
    """With the recipe's random parts on (drop-path, colour jitter, random erasing, mixup / cutmix, whose draws
    come from numpy's global RNG, and the EMA, whose weights are the best epoch's)."""
    script = tmp_path / "train_once.py"
    recipe = {"ema_decay": 0.9, "mixup": 0.8, "cutmix": 1.0, "re_prob": 0.5}
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent), recipe=recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out: Path, kill_at: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), str(tmp_path / "images"), str(out), str(kill_at)],
                              capture_output=True, text=True, env=env, timeout=300)

    whole = run(tmp_path / "whole", -1)
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout.split() == ["fresh", "2"]
    # 12 training images, batch 4: 3 steps an epoch; killed at step 5 (epoch 2, one step after the checkpoint
    # at step 4 that is itself mid-epoch 2), i.e. mid-epoch with a step of work lost
    killed = run(tmp_path / "killed", 5)
    assert killed.returncode == -signal.SIGKILL
    state = torch.load(tmp_path / "killed" / STATE_FILE, weights_only=True)
    assert (state["epoch"], state["position"], state["step"], state["done"]) == (1, 1, 4, False)
    resumed = run(tmp_path / "killed", -1)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.split() == ["resumed", "2"]
    a = torch.load(tmp_path / "whole" / STATE_FILE, weights_only=True)
    b = torch.load(tmp_path / "killed" / STATE_FILE, weights_only=True)
    assert a["step"] == b["step"] == 6 and a["done"] and b["done"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["ema"] is not None and a["ema"].keys() == b["ema"].keys()
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    assert not all(torch.equal(a["ema"][k], a["model"][k.removeprefix("module.")]) for k in a["ema"])
    assert a["best"] == b["best"]
    best_a = safetensors.torch.load_file(tmp_path / "whole" / f"best-epoch{a['best']['epoch']}.safetensors")
    best_b = safetensors.torch.load_file(tmp_path / "killed" / f"best-epoch{b['best']['epoch']}.safetensors")
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    assert a["history"] == b["history"]


def test_a_corrupt_training_state_is_named_and_nothing_is_overwritten(data: TrainData, tmp_path: Path) -> None:
    params = params_for("full", "cnn")
    backbone = load_for_training(TINY["cnn"], params)
    (tmp_path / STATE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(TrainingError, match=r"state\.pt is not a readable training state"):
        train(build_trainable(backbone, data.n_classes, params), backbone, data, params, train_files(tmp_path),
              policy=POLICY, progress=False)
    assert (tmp_path / STATE_FILE).read_bytes() == b"not a torch file"


def test_lp_ft_needs_the_probe_and_the_head_starts_from_it() -> None:
    params = params_for("lp-ft", "cnn")
    backbone = load_for_training(TINY["cnn"], params)
    with pytest.raises(TrainingError, match="linear probe"):
        build_trainable(backbone, 3, params)
    w = np.arange(3 * backbone.feature_dim, dtype=np.float32).reshape(3, -1)
    t = build_trainable(backbone, 3, params, head_init=(w, np.array([1, 2, 3], np.float32)))
    assert torch.equal(t.model.head.weight, torch.from_numpy(w))
    assert t.model.head.bias.tolist() == [1, 2, 3]


@pytest.mark.parametrize("freeze", [True, False])
def test_batch_norm_statistics_stay_pretrained_unless_asked(freeze: bool, data: TrainData, tmp_path: Path) -> None:
    params = params_for("full", "cnn", freeze_bn_stats=freeze)
    backbone = load_for_training(TINY["cnn"], params)
    stats = {k: v.clone() for k, v in backbone.model.state_dict().items() if "running_" in k}
    t = build_trainable(backbone, data.n_classes, params)
    train(t, backbone, data, params, train_files(tmp_path), policy=POLICY, progress=False)
    after = t.model.backbone.state_dict()
    same = [torch.equal(stats[k], after[k]) for k in stats]
    assert all(same) if freeze else not any(same)


def test_the_optional_recipe_parts_train_and_resume(data: TrainData, tmp_path: Path) -> None:
    """mixup + cutmix, EMA, RandAugment, gradient accumulation and checkpointing together, on a ViT: an epoch
    trains, the EMA's weights are the ones kept, and a second call finds the state finished."""
    params = params_for("full", "vit", epochs=1, mixup=0.8, cutmix=1.0, ema_decay=0.9, grad_accum=2,
                        grad_checkpointing=True, randaugment="rand-m9-mstd0.5-inc1")
    backbone = load_for_training(TINY["vit"], params)
    t = build_trainable(backbone, data.n_classes, params)
    out = train(t, backbone, data, params, train_files(tmp_path), policy=POLICY, progress=False)
    assert out.epochs_run == 1 and np.isfinite(out.history[0]["train_loss"])
    assert out.history[0]["step"] == len(data.train) // 4 // 2  # one optimizer step per 2 batches of 4
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert state["ema"] is not None
    best = safetensors.torch.load_file(out.best_path)
    ema = {k.removeprefix("module."): v for k, v in state["ema"].items()}
    assert set(best) == set(ema) and all(torch.equal(best[k], ema[k]) for k in best)
    again = train(build_trainable(load_for_training(TINY["vit"], params), data.n_classes, params), backbone, data,
                  params, train_files(tmp_path), policy=POLICY, progress=False)
    assert again.resumed and again.history == out.history


@pytest.mark.parametrize("re_prob", [0.0, 1.0])
def test_random_erasing_puts_a_noise_box_into_every_view_at_1_and_none_at_0(re_prob: float, tmp_path: Path) -> None:
    """A flat grey image stays flat through crop and flip: any other pixel is erasing's noise, inside one box;
    the same seed gives the same view (a replayed epoch's pixels)."""
    from PIL import Image

    from dogbench.training import TrainImages

    params = params_for("full", "cnn", re_prob=re_prob, color_jitter=0.0)
    assert ("re_prob" in params.to_dict()) == (re_prob > 0)  # at 0, saved states keep their digest
    path = tmp_path / "grey.png"
    Image.new("RGB", (40, 36), (120, 120, 120)).save(path)
    images = TrainImages([Sample(path, "grey", 0, "train", None)], load_for_training(TINY["cnn"], params).preprocess,
                         params, crop_to_box=False, reduced_decode=False)
    decoded = images.decode(0)
    for seed in range(8):
        x = images.augment(decoded, seed)
        assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
        assert torch.equal(x, images.augment(decoded, seed))
        erased = (x != 120).any(dim=0)
        if re_prob == 0:
            assert not erased.any()
            continue
        rows, cols = erased.any(dim=1).nonzero().flatten(), erased.any(dim=0).nonzero().flatten()
        assert len(rows) and len(cols), f"seed {seed}: nothing erased"
        box = erased[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.float().mean() > 0.9 and erased.sum() == box.sum()  # noise fills one rectangle


def test_wise_mix_interpolates_the_weights_and_keeps_counters() -> None:
    from dogbench.training import wise_mix

    start = {"w": torch.zeros(3), "n": torch.tensor(0)}
    tuned = {"w": torch.tensor([2.0, 4.0, -6.0]), "n": torch.tensor(7)}
    assert torch.equal(wise_mix(start, tuned, 0.0)["w"], start["w"])
    assert torch.equal(wise_mix(start, tuned, 1.0)["w"], tuned["w"])
    half = wise_mix(start, tuned, 0.5)
    assert torch.equal(half["w"], torch.tensor([1.0, 2.0, -3.0])) and int(half["n"]) == 7


def test_standalone_validation_scores_the_best_epoch_as_training_did(data: TrainData, tmp_path: Path) -> None:
    """WiSE-FT compares its mixes with training's own validation figure: the two scorers must agree."""
    from dogbench.training import load_best, validation_score

    params = params_for("full", "cnn", epochs=2)
    backbone = load_for_training(TINY["cnn"], params)
    t = build_trainable(backbone, data.n_classes, params)
    out = train(t, backbone, data, params, train_files(tmp_path), policy=POLICY, progress=False)
    load_best(t, out.best_path)
    assert validation_score(t, backbone, data, params, policy=POLICY) == out.best_val_top1


def test_a_training_state_that_would_run_code_is_refused_and_its_payload_never_runs(data: TrainData,
                                                                                    tmp_path: Path) -> None:
    """A state.pt from elsewhere (a shared run folder, a download) goes through weights_only like weights do."""
    from test_backbones import Payload

    marker = tmp_path / "pwned"
    torch.save({"format": 1, "model": Payload(marker)}, tmp_path / STATE_FILE)
    params = params_for("full", "cnn")
    backbone = load_for_training(TINY["cnn"], params)
    with pytest.raises(TrainingError, match=r"state\.pt is not a readable training state .*UnpicklingError"):
        train(build_trainable(backbone, data.n_classes, params), backbone, data, params, train_files(tmp_path),
              policy=POLICY, progress=False)
    assert not marker.exists(), "unpickling ran the payload"


def test_a_best_checkpoint_from_another_model_is_refused_by_name(data: TrainData, tmp_path: Path) -> None:
    from dogbench.training import load_best

    params = params_for("full", "cnn")
    t = build_trainable(load_for_training(TINY["cnn"], params), data.n_classes, params)
    other = build_trainable(load_for_training(TINY["vit"], params_for("full", "vit")), data.n_classes, params)
    path = tmp_path / "best-epoch1.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(path))
    with pytest.raises(TrainingError,
                       match=r"best-epoch1\.safetensors does not fit this model: \d+ missing keys .*unexpected keys"):
        load_best(t, path)
