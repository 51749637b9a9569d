"""Fine-tuning one timm backbone with a linear head (interim: the split into modules is under way)."""

from dogbench.training.loop import (  # noqa: F401
    BEST_PREFIX, DEFAULT_DROP_PATH, METHOD_DEFAULTS, STATE_FILE, STATE_FORMAT, Classifier, Stepper, Trainable,
    TrainData, TrainImages, TrainingError, TrainOutcome, TrainParams, base_name, best_file, build_trainable,
    epoch_batches, evaluate_logits, export, layer_map, load_best, load_for_training, load_last, load_state,
    lora_targets, lr_factor, new_head, param_groups, resolve_params, sample_seed, seeded, set_train_mode, train,
    validation_logits, validation_top1, wise_mix,
)
