"""The training loop on one screen: ``train`` runs ``train_one_epoch``, ``end_epoch`` (validate, keep the best,
save) and the stop check over a ``LoopState``; resumable from its state file, rank-aware under torchrun."""

from __future__ import annotations

import os
import resource
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn
from tqdm.auto import tqdm

from dogbench import distributed, track
from dogbench.atomic import atomic_write_bytes, atomic_write_json
from dogbench.backbones import Backbone, Preprocess
from dogbench.config import Balance, Precision, TuneMetric
from dogbench.device import Policy, accelerator_indices, cpu_cores
from dogbench.features.cache import cache_key
from dogbench.heads.fit import balanced_weights
from dogbench.training.data import TrainData, TrainImages, draw_probabilities, sample_seed, seeded, usable_batches
from dogbench.training.model import Trainable, set_train_mode
from dogbench.training.recipe import TrainingError, TrainParams, loss_function, lr_factor, param_groups
from dogbench.training.state import STATE_FORMAT, TrainFiles, load_state, rng_state, save_state, set_rng_state, tensors
from dogbench.training.validate import VAL_BATCH_SIZE, Validator


@dataclass(frozen=True)
class TrainOutcome:
    """A finished training: the best epoch's weights are ``best_path`` (the Classifier's state dict)."""

    best_path: Path
    state_path: Path  # the finished training state (the last epoch's weights, for a refit)
    best_epoch: int  # 1-based
    best_val_top1: float
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]]
    trainable_params: int
    total_params: int
    train_wall_s: float  # training and per-epoch validation, summed over resumed sessions
    train_cpu_s: float
    train_images: int  # training images the steps consumed
    images_per_s: float  # train_images / the wall seconds spent in training steps (data loading included)
    peak_memory_mb: float  # CUDA: max allocated; CPU: the largest resident set after a step (sampled every step)
    precision: str  # what training's autocast ran
    val_precision: str  # what validation ran: the precision that scores test (features.precision resolved)
    resumed: bool
    start_val_top1: float | None = None  # lp-ft: validation top-1 before the first step (the probe's head)
    ranks: int = 1  # torchrun's world size (1: one process); the batch is global, split over the ranks


class Stepper:
    """One training step of the recipe, shared by the loop, ``dogbench bench --train`` and the tests: a uint8
    batch is normalised on the policy's device in its memory format, mixed (mixup / cutmix when on), run under
    the policy's training autocast in ``params.precision``, and its loss back-propagated (divided by
    ``grad_accum``); ``optimizer_step`` then steps AdamW (parameter groups with their layer scales), the warm-up
    + cosine schedule and the EMA. Under torchrun the model runs inside DistributedDataParallel
    (``forward_model``; ``model`` stays the plain module)."""

    def __init__(self, trainable: Trainable, preprocess: Preprocess, params: TrainParams, *, policy: Policy,
                 n_classes: int, total_steps: int, steps_per_epoch: int,
                 class_weights: torch.Tensor | None = None) -> None:

        self.model, self.preprocess, self.params, self.policy = trainable.model, preprocess, params, policy
        self.device, self.memory_format = policy.device, policy.memory_format(is_vit=trainable.is_vit)
        self.model.to(self.device, memory_format=self.memory_format)
        self.ranks = distributed.current()
        self.forward_model = self._parallel(self.device)
        warmup = min(total_steps, round(params.warmup_epochs * steps_per_epoch))
        self.optimizer = torch.optim.AdamW(param_groups(trainable, params), lr=params.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total=total_steps, warmup=warmup, min_ratio=params.min_lr_ratio))
        self.ema = None
        if params.ema_decay > 0:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=params.ema_decay)
        self.mixer = None
        if params.mixup > 0 or params.cutmix > 0:
            from timm.data import Mixup

            self.mixer = Mixup(mixup_alpha=params.mixup, cutmix_alpha=params.cutmix,
                               label_smoothing=params.label_smoothing, num_classes=n_classes)
        self.loss_fn = loss_function(params, mixed=self.mixer is not None, class_weights=class_weights,
                                     device=self.device)

    def _parallel(self, device: torch.device) -> nn.Module:
        """The module the forward pass runs: DDP around ``model`` under torchrun (CUDA batch norms synced)."""
        if self.ranks.world == 1:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda" and not self.params.freeze_bn_stats:
            nn.SyncBatchNorm.convert_sync_batchnorm(self.model)  # replaces the Classifier's children in place
        return DistributedDataParallel(self.model, device_ids=accelerator_indices(device) or None)

    @property
    def evaluated(self) -> nn.Module:
        """The weights validation scores and the best epoch keeps: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, *, sync: bool = True) -> float:
        """Forward and backward of one uint8 (B, 3, H, W) batch with labels ``y``; the (unscaled) loss, averaged
        over the ranks under torchrun. ``sync=False``: a micro-batch before the last of an accumulation, whose
        gradients DDP keeps local (``no_sync``) until the last one's backward averages them all."""
        x = self.preprocess.normalize(x.to(self.device, non_blocking=True)).contiguous(
            memory_format=self.memory_format)
        y = y.to(self.device, non_blocking=True)
        if self.mixer is not None:
            x, y = self.mixer(x, y)
        local = self.forward_model.no_sync() if not sync and self.forward_model is not self.model else nullcontext()
        with local:
            with self.policy.train_autocast(Precision(self.params.precision)):
                loss = self.loss_fn(self.forward_model(x), y)
            value = loss.detach()
            if self.ranks.world > 1:  # every rank sees the same value, so all of them stop together
                value = distributed.all_sum(value.float().clone()) / self.ranks.world
            if not torch.isfinite(value):
                raise TrainingError(f"the training loss became {value.item()}: lower finetune.lr (now "
                                    f"{self.params.lr:g})")
            (loss / self.params.grad_accum).backward()
        return float(value)

    def optimizer_step(self, step: int) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=step)


@dataclass
class LoopState:
    """Where the loop is: what the training state saves (``SAVED``), whether it was resumed, and the clock."""

    SAVED = ("epoch", "position", "step", "history", "best", "bad_epochs", "done", "spent", "epoch_loss",
             "start_val")

    epoch: int = 0  # epochs finished
    position: int = 0  # micro-batches of this epoch done
    step: int = 0  # optimizer steps done
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "val_top1": -1.0})
    bad_epochs: int = 0
    done: bool = False
    spent: dict[str, float] = field(default_factory=lambda: {"wall": 0.0, "cpu": 0.0, "step_wall": 0.0,
                                                             "images": 0})
    epoch_loss: list[float] = field(default_factory=lambda: [0.0, 0])  # loss x images, images
    start_val: float | None = None
    resumed: bool = False
    clock: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # this session's start, the spent before

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> LoopState:
        return cls(**{k: saved.get(k) for k in cls.SAVED}, resumed=True)

    def saved(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.SAVED}

    def start_clock(self) -> None:
        self.clock = (time.perf_counter(), _cpu(), self.spent["wall"], self.spent["cpu"])

    def charge_time(self) -> None:
        """The wall and CPU seconds of every session so far, into ``spent``."""
        wall0, cpu0, base_wall, base_cpu = self.clock
        self.spent["wall"], self.spent["cpu"] = base_wall + time.perf_counter() - wall0, base_cpu + _cpu() - cpu0


@dataclass
class Loop:
    """What stays fixed through one call of ``train``: the model and its step, the data, the files, the rank."""

    trainable: Trainable
    params: TrainParams
    data: TrainData
    files: TrainFiles
    policy: Policy
    ranks: distributed.Ranks
    stepper: Stepper
    images: TrainImages
    validator: Validator
    digest: str
    steps_per_epoch: int
    checkpoint_every: int
    on_step: Callable[[int], None] | None

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def mine(self, rows: np.ndarray) -> np.ndarray:
        """This rank's rows of a global batch (DistributedSampler's strided split)."""
        return rows[self.ranks.rank :: self.ranks.world]


def train(
    trainable: Trainable, backbone: Backbone, data: TrainData, params: TrainParams, files: TrainFiles, *,
    policy: Policy, checkpoint_every: int = 0, progress: bool = True,
    on_epoch: Callable[[int, float], None] | None = None, on_step: Callable[[int], None] | None = None,
) -> TrainOutcome:
    """Train ``trainable`` on ``data.train`` (on ``policy.device``, steps in ``params.precision``), validate on
    ``data.val`` after every epoch at ``policy.precision`` (the precision that scores test), keep the best epoch's
    weights, stop after ``params.patience`` epochs without improvement; resume from ``files.state`` when it was
    written for these params and data (another state there is replaced, with a warning). ``on_epoch(epoch,
    val_top1)`` runs after each epoch's validation (an Optuna pruner raises from it; under torchrun on rank 0, the
    other ranks stop with it); ``on_step(step)`` after each optimizer step and its checkpoint, on every rank."""
    device = policy.device
    accelerators = accelerator_indices(device)
    # dropout, drop-path and mixup draw from the global RNGs (the device's too): the caller's states are kept;
    # under torchrun each rank draws its own (seed + rank, as timm's train.py seeds them)
    seed = params.seed + distributed.current().rank
    with seeded(seed), torch.random.fork_rng(devices=accelerators):
        if accelerators:
            torch.cuda.manual_seed(seed)
        loop = _setup(trainable, backbone.preprocess, data, params, files, policy=policy,
                      checkpoint_every=checkpoint_every, on_step=on_step)
        return run_loop(loop, _resume(loop), label=backbone.label, progress=progress, on_epoch=on_epoch)


def run_loop(loop: Loop, state: LoopState, *, label: str, progress: bool,
             on_epoch: Callable[[int, float], None] | None) -> TrainOutcome:
    """Epochs of optimizer steps, each ended by validation, the best epoch's weights, the state and the stop
    check, until the last epoch, early stopping or ``on_epoch``'s stop."""
    params = loop.params
    state.start_clock()
    if loop.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(loop.device)
    bar = tqdm(total=loop.steps_per_epoch * params.epochs, initial=state.step, unit="step", leave=False,
               desc=f"{params.method} {label}" + (f" ({loop.ranks.world} ranks)" if loop.ranks.world > 1 else ""),
               disable=not (progress and loop.ranks.main))
    if params.method == "lp-ft" and not state.resumed:  # where LP-FT starts: the probe's head, pretrained
        state.start_val = loop.validator.scores(loop.trainable.model)[params.metric]
    pool = ThreadPoolExecutor(max_workers=cpu_cores(), thread_name_prefix="train-decode")
    try:
        while not state.done and state.epoch < params.epochs:
            train_one_epoch(loop, state, pool, bar)
            top1 = end_epoch(loop, state)
            if loop.ranks.main:  # after the checkpoint that holds the epoch: a resumed run logs only later ones
                track.active().epoch(loop.files.state.parent, state.history[-1])
            if progress:
                bar.set_postfix(val_top1=f"{top1:.4f}", best=f"{state.best['val_top1']:.4f}")
            if stop_requested(loop, state.epoch, top1, on_epoch):
                break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return _outcome(loop, state)


def _check_sizes(data: TrainData, params: TrainParams, ranks: distributed.Ranks) -> None:
    """Enough images for training and validation, a global batch that splits evenly over the ranks, and an
    even per-rank batch for mixup / cutmix."""
    n = len(data.train)
    if n < 1 or len(data.val) < 1:
        raise TrainingError(f"fine-tuning needs training and validation images, got {n} and {len(data.val)}")
    if ranks.world > 1 and (min(params.batch_size, n) % ranks.world or len(data.val) < ranks.world):
        raise TrainingError(
            f"finetune.batch_size={params.batch_size} is the global batch, split over the {ranks.world} ranks: "
            f"it (or the {n} training images when fewer) must be a multiple of {ranks.world} (e.g. "
            f"{ranks.world * max(1, params.batch_size // ranks.world)}), with at least {ranks.world} validation "
            f"images (there are {len(data.val)})")
    rank_batch = min(params.batch_size, n) // ranks.world
    if (params.mixup > 0 or params.cutmix > 0) and rank_batch % 2:
        raise TrainingError(f"mixup / cutmix need an even batch size per rank, got {rank_batch}")


def _setup(trainable: Trainable, preprocess: Preprocess, data: TrainData, params: TrainParams, files: TrainFiles,
           *, policy: Policy, checkpoint_every: int,
           on_step: Callable[[int], None] | None) -> Loop:
    """The loop's fixed parts, after the checks; rank 0 writes the params record (with the state's digest)."""
    ranks = distributed.current()
    if ranks.main:
        files.state.parent.mkdir(parents=True, exist_ok=True)
    _check_sizes(data, params, ranks)
    steps_per_epoch = max(1, max(1, len(data.train) // params.batch_size) // params.grad_accum)
    weights = balanced_weights(torch.from_numpy(data.train_labels.astype(np.int64)), data.n_classes) \
        if params.balance == Balance.WEIGHTS else None
    stepper = Stepper(trainable, preprocess, params, policy=policy, n_classes=data.n_classes,
                      total_steps=steps_per_epoch * params.epochs, steps_per_epoch=steps_per_epoch,
                      class_weights=weights)
    images = TrainImages(data.train, preprocess, params, crop_to_box=data.crop_to_box,
                         reduced_decode=data.reduced_decode)
    validator = Validator(data, preprocess, policy=policy, is_vit=trainable.is_vit,
                          batch_size=max(params.batch_size, VAL_BATCH_SIZE), rank=ranks.rank, world=ranks.world)
    digest = cache_key({"params": params.to_dict(), "data": data.digest(), "format": STATE_FORMAT,
                        "val_precision": policy.precision.value,
                        "model": sorted((k, list(v.shape)) for k, v in trainable.model.state_dict().items())})
    if ranks.main:
        atomic_write_json(files.params, {"params": params.to_dict(), "digest": digest,
                                         "val_precision": policy.precision.value})
    return Loop(trainable, params, data, files, policy, ranks, stepper, images, validator, digest, steps_per_epoch,
                checkpoint_every, on_step)


def _resume(loop: Loop) -> LoopState:
    """The saved state when ``loop.files.state`` was written for this training (weights, optimizer, scheduler,
    EMA and RNGs restored), else a fresh one. Every rank reads it (a shared filesystem under torchrun)."""
    path, ranks, stepper = loop.files.state, loop.ranks, loop.stepper
    if not path.is_file():
        return LoopState()
    saved = load_state(path)
    if saved.get("digest") != loop.digest:
        warnings.warn(f"{path} was written for other settings or data; training from the start", stacklevel=2)
        return LoopState()
    if saved.get("ranks", 1) != ranks.world and not saved["done"]:
        raise TrainingError(
            f"{path} was written by {saved.get('ranks', 1)} rank(s), and the batches and RNGs of the replay "
            f"depend on it: resume with {saved.get('ranks', 1)} (torchrun --nproc-per-node, times --nnodes), not "
            f"{ranks.world}, or delete {path.parent} to train from the start")
    loop.trainable.model.load_state_dict(saved["model"])
    stepper.optimizer.load_state_dict(saved["optimizer"])
    stepper.scheduler.load_state_dict(saved["scheduler"])
    if stepper.ema is not None and saved.get("ema") is not None:
        stepper.ema.load_state_dict(saved["ema"])
    set_rng_state(saved["rng_ranks"][ranks.rank] if ranks.world > 1 else saved["rng"], loop.device)
    return LoopState.from_saved(saved)


def _plan(loop: Loop, epoch: int) -> list[np.ndarray]:
    """The epoch's micro-batches of image indices (class-balanced draws under ``data.balance = sampler``)."""
    draw = draw_probabilities(loop.data.train_labels) if loop.params.balance == Balance.SAMPLER else None
    return usable_batches(len(loop.data.train), loop.params, epoch=epoch, draw=draw)


def _augment_keys(loop: Loop, state: LoopState, rows: np.ndarray) -> np.ndarray:
    """What seeds each image's augmentation in this epoch: its index, or under the sampler (which may draw an
    image twice in an epoch) the draw's position, so each draw gets its own crop."""
    if loop.params.balance != Balance.SAMPLER:
        return rows
    return len(loop.data.train) + state.position * loop.params.batch_size + np.arange(len(rows))


def train_one_epoch(loop: Loop, state: LoopState, pool: ThreadPoolExecutor, bar: Any) -> None:
    """The rest of epoch ``state.epoch`` from ``state.position``: each batch decodes in ``pool`` while the one
    before it trains."""
    batches = _plan(loop, state.epoch)
    set_train_mode(loop.trainable.model, freeze_bn_stats=loop.params.freeze_bn_stats)
    pending = pool.map(loop.images.decode, loop.mine(batches[state.position])) \
        if state.position < len(batches) else None
    while state.position < len(batches):
        t0 = time.perf_counter()
        decoded = list(pending)
        if state.position + 1 < len(batches):
            pending = pool.map(loop.images.decode, loop.mine(batches[state.position + 1]))
        train_batch(loop, state, batches, decoded)
        if state.position % loop.params.grad_accum == 0 or state.position == len(batches):
            optimizer_step(loop, state, bar, t0, epoch_ends=state.position == len(batches))
        else:
            state.spent["step_wall"] += time.perf_counter() - t0


def train_batch(loop: Loop, state: LoopState, batches: list[np.ndarray], decoded: list[Any]) -> None:
    """Forward and backward of micro-batch ``state.position`` (``decoded``: this rank's images of it)."""
    rows = batches[state.position]
    local, keys = loop.mine(rows), loop.mine(_augment_keys(loop, state, rows))
    seed, epoch = loop.params.seed, state.epoch
    x = torch.stack([loop.images.augment(img, sample_seed(seed, epoch, int(k)))
                     for img, k in zip(decoded, keys, strict=True)])
    last = (state.position + 1) % loop.params.grad_accum == 0 or state.position + 1 == len(batches)
    loss = loop.stepper.forward_backward(x, torch.from_numpy(loop.data.train_labels[local].astype(np.int64)),
                                         sync=last)
    state.epoch_loss = [state.epoch_loss[0] + loss * len(rows), state.epoch_loss[1] + len(rows)]
    state.position += 1
    state.spent["images"] += len(rows)


def optimizer_step(loop: Loop, state: LoopState, bar: Any, t0: float, *, epoch_ends: bool) -> None:
    """The optimizer step after the last micro-batch of an accumulation, its costs, the mid-epoch checkpoint
    every ``checkpoint_every`` steps (the epoch's end saves anyway), then ``on_step``."""
    loop.stepper.optimizer_step(state.step)
    state.step += 1
    bar.update(1)
    state.spent["step_wall"] += time.perf_counter() - t0
    if loop.device.type == "cpu":  # sampled after each step: the training's own peak, not the process's
        state.spent["peak_mb"] = max(state.spent.get("peak_mb", 0.0), _resident_mb())
    if loop.checkpoint_every and state.step % loop.checkpoint_every == 0 and not epoch_ends:
        save(loop, state)
    if loop.on_step is not None:
        loop.on_step(state.step)


def end_epoch(loop: Loop, state: LoopState) -> float:
    """Validate the epoch, keep its weights when it is the best so far, count epochs without improvement,
    save the state, and remove best-epoch files the state no longer names; the epoch's validation top-1."""
    evaluated, metric = loop.stepper.evaluated, loop.params.metric
    scores = loop.validator.scores(evaluated)
    top1 = scores[metric]  # tune.metric's value (top-1 by default): what picks the best epoch and prunes trials
    state.history.append({"epoch": state.epoch + 1, "train_loss": state.epoch_loss[0] / max(1, state.epoch_loss[1]),
                          "val_top1": scores[TuneMetric.TOP1.value],
                          **({f"val_{metric}": top1} if metric != TuneMetric.TOP1 else {}),
                          "lr": float(loop.stepper.optimizer.param_groups[0]["lr"]), "step": state.step})
    if top1 > state.best["val_top1"]:
        # a file per best epoch, written before the state that names it: a kill between the two leaves the
        # state's own best file in place (the newer one is replaced when the epoch is replayed)
        state.best = {"epoch": state.epoch + 1, "val_top1": top1}
        if loop.ranks.main:
            atomic_write_bytes(loop.files.best(state.epoch + 1), safetensors.torch.save(tensors(evaluated)))
        state.bad_epochs = 0
    else:
        state.bad_epochs += 1
    state.epoch, state.position, state.epoch_loss = state.epoch + 1, 0, [0.0, 0]
    state.done = state.epoch >= loop.params.epochs or state.bad_epochs >= loop.params.patience
    save(loop, state)
    keep = loop.files.best(state.best["epoch"])
    for old in loop.files.best_files() if loop.ranks.main else ():
        if old != keep:
            old.unlink(missing_ok=True)
    return top1


def save(loop: Loop, state: LoopState) -> None:
    """The training state, atomically: every rank's RNGs gathered (a collective), rank 0 writes."""
    state.charge_time()
    rngs = distributed.gather(rng_state(loop.device))
    if not loop.ranks.main:
        return
    stepper = loop.stepper
    save_state(loop.files.state, {
        "format": STATE_FORMAT, "digest": loop.digest, "model": loop.trainable.model.state_dict(),
        "optimizer": stepper.optimizer.state_dict(), "scheduler": stepper.scheduler.state_dict(),
        "ema": stepper.ema.state_dict() if stepper.ema is not None else None, "rng": rngs[0], **state.saved(),
        **({"ranks": loop.ranks.world, "rng_ranks": rngs} if loop.ranks.world > 1 else {}),
    })


def stop_requested(loop: Loop, epoch: int, top1: float, on_epoch: Callable[[int, float], None] | None) -> bool:
    """Whether rank 0's ``on_epoch`` stopped the training (an Optuna pruner): every rank learns it, then what
    it raised is raised again."""
    stop, raised = [False], None
    if on_epoch is not None and loop.ranks.main:
        try:
            on_epoch(epoch, top1)
        except BaseException as err:  # noqa: BLE001 - re-raised below, once the other ranks know
            stop, raised = [True], err
    if loop.ranks.world > 1:
        stop = distributed.broadcast(stop)
    if raised is not None:
        raise raised
    return bool(stop[0])


def _outcome(loop: Loop, state: LoopState) -> TrainOutcome:
    best_path = loop.files.best(state.best["epoch"])
    if loop.ranks.main and not best_path.is_file():
        raise TrainingError(f"{best_path} is missing although {loop.files.state} says training finished; delete "
                            f"{loop.files.state.parent} to train again")
    spent = state.spent
    if loop.device.type == "cuda":
        spent["peak_mb"] = max(spent.get("peak_mb", 0.0), torch.cuda.max_memory_allocated(loop.device) / 2**20)
    t = loop.trainable
    return TrainOutcome(
        best_path=best_path, state_path=loop.files.state, best_epoch=int(state.best["epoch"]),
        best_val_top1=float(state.best["val_top1"]), epochs_run=len(state.history),
        stopped_early=len(state.history) < loop.params.epochs, history=state.history,
        trainable_params=t.trainable_params, total_params=t.total_params, train_wall_s=float(spent["wall"]),
        train_cpu_s=float(spent["cpu"]), train_images=int(spent["images"]),
        images_per_s=spent["images"] / spent["step_wall"] if spent["step_wall"] > 0 else 0.0,
        peak_memory_mb=float(spent.get("peak_mb", 0.0)), precision=loop.params.precision,
        val_precision=loop.policy.precision.value, resumed=state.resumed, start_val_top1=state.start_val,
        ranks=loop.ranks.world,
    )


def _resident_mb() -> float:
    """This process's resident set now (Linux /proc; elsewhere its peak so far)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu() -> float:
    t = os.times()
    return t.user + t.system
