"""Fine-tuning one timm backbone with a linear head: recipe, model, data, state, validation and the loop
(docs/guide/finetuning.md tells the whole story)."""

from dogbench.training.data import (
    TrainData,
    TrainImages,
    draw_probabilities,
    epoch_batches,
    sample_seed,
    seeded,
    usable_batches,
)
from dogbench.training.loop import LoopState, Stepper, TrainOutcome, train
from dogbench.training.model import (
    Classifier,
    Trainable,
    build_trainable,
    export,
    layer_map,
    load_best,
    load_for_training,
    load_last,
    lora_targets,
    new_head,
    set_train_mode,
    wise_mix,
)
from dogbench.training.recipe import (
    DEFAULT_DROP_PATH,
    METHOD_DEFAULTS,
    TrainingError,
    TrainParams,
    base_name,
    lr_factor,
    param_groups,
    resolve_params,
    training_precision,
)
from dogbench.training.state import STATE_FORMAT, TrainFiles, load_state
from dogbench.training.validate import Validator, validation_proba, validation_score

__all__ = [
    "DEFAULT_DROP_PATH", "METHOD_DEFAULTS", "STATE_FORMAT", "Classifier", "LoopState", "Stepper", "TrainData",
    "TrainFiles", "TrainImages", "TrainOutcome", "TrainParams", "Trainable", "TrainingError", "Validator",
    "base_name", "build_trainable", "epoch_batches", "export", "layer_map", "load_best", "load_for_training",
    "load_last", "load_state", "lora_targets", "lr_factor", "new_head", "param_groups", "resolve_params",
    "sample_seed", "seeded", "set_train_mode", "train", "training_precision", "usable_batches", "validation_proba",
    "validation_score", "wise_mix", "draw_probabilities",
]
