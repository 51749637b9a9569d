"""The fine-tuning recipe search's space (``finetune.trials``): lr, weight decay, layer decay (ViTs) and the LoRA
rank around the method's defaults, and the recipe parts (EMA, mixup + cutmix, RandAugment, random erasing) on or
off; the configured recipe is the first trial. ``finetune.budget_s`` bounds the search's wall time."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from dogbench.training import TrainParams

RECIPE_SPACE_VERSION = 2  # in the study's name: a study of the space before the recipe parts is another study
RANDAUGMENT = "rand-m9-mstd0.5-inc1"  # timm's train.py and DeiT's RandAugment, when the config names none
MIXUP, CUTMIX = 0.8, 1.0  # DeiT's mixup and cutmix alphas, when the config sets neither
RE_PROB_MAX = 0.5  # the random erasing probabilities searched: 0 .. 0.5 (DeiT: 0.25)


def ema_decay_for(steps_per_epoch: int) -> float:
    """A searched EMA's decay: an average over about an epoch of steps, within 0.9 .. timm's 0.9998 (made for
    ImageNet's hundreds of thousands of steps, where a short fine-tuning would keep its start)."""
    return min(0.9998, max(0.9, 1.0 - 1.0 / max(1, steps_per_epoch)))


def mixes(base: TrainParams) -> bool:
    """Whether mixup / cutmix can be searched: they pair images, so the batch must be even."""
    return base.batch_size % 2 == 0


def suggest_recipe(trial: optuna.Trial, method: str, base: TrainParams, *, is_vit: bool,
                   steps_per_epoch: int) -> dict[str, Any]:
    """A trial's recipe as overrides of ``base``: lr around the method's default (/10 .. x10), weight decay,
    layer decay for ViTs (full, lp-ft), the LoRA rank, and each recipe part on or off (a part on takes the
    config's setting when it has one, else the published default above)."""
    out: dict[str, Any] = {
        "lr": trial.suggest_float("lr", base.lr / 10, base.lr * 10, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-5, 0.1, log=True),
    }
    if is_vit and method in ("full", "lp-ft"):
        out["layer_decay"] = trial.suggest_float("layer_decay", 0.5, 1.0)
    if method == "lora":
        out["lora_rank"] = trial.suggest_categorical("lora_rank", [4, 8, 16])
        out["lora_alpha"] = 2.0 * out["lora_rank"]
    ema = trial.suggest_categorical("ema", [False, True])
    out["ema_decay"] = (base.ema_decay or ema_decay_for(steps_per_epoch)) if ema else 0.0
    if mixes(base):
        mixed = base.mixup > 0 or base.cutmix > 0
        on = trial.suggest_categorical("mixup", [False, True])
        out["mixup"], out["cutmix"] = ((base.mixup, base.cutmix) if mixed else (MIXUP, CUTMIX)) if on else (0.0, 0.0)
    randaugment = trial.suggest_categorical("randaugment", [False, True])
    out["randaugment"] = (base.randaugment or RANDAUGMENT) if randaugment else None
    out["re_prob"] = trial.suggest_float("re_prob", 0.0, max(RE_PROB_MAX, base.re_prob))
    return out


def start_params(method: str, base: TrainParams, *, is_vit: bool) -> dict[str, Any]:
    """The configured recipe in the space's terms: the search's first trial."""
    return {
        "lr": base.lr, "weight_decay": base.weight_decay,
        **({"layer_decay": base.layer_decay} if is_vit and method in ("full", "lp-ft") else {}),
        **({"lora_rank": base.lora_rank} if method == "lora" else {}),
        "ema": base.ema_decay > 0, **({"mixup": base.mixup > 0 or base.cutmix > 0} if mixes(base) else {}),
        "randaugment": base.randaugment is not None, "re_prob": base.re_prob,
    }


def search_record(name: str, trials: list[FrozenTrial], best: FrozenTrial, *, wanted: int,
                  budget_s: float | None) -> dict[str, Any]:
    """The search's record in the fine-tuned row: its trials, the best, and what stopped it (``budget`` when
    ``finetune.budget_s`` ran out before ``finetune.trials`` trials finished; the best finished trial won)."""
    states = [t.state for t in trials]
    finished = states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED)
    return {"study": name, "n_trials": len(trials), "n_pruned": states.count(TrialState.PRUNED),
            "best_params": best.params, "best_val_top1": best.value, "budget_s": budget_s,
            "stopped_by": "budget" if budget_s is not None and finished < wanted else "trials"}
