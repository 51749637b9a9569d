"""Frozen, typed configuration for every stage, loaded from TOML and overridden from the command line.

One override syntax everywhere: ``section.key=value`` (``tune.trials=5``, ``features.batch_size=32``,
``backbones.vit.img_size=224``); values are parsed as TOML literals, falling back to plain strings.
The resolved config is written beside every result (``config.json``) so a run can be reproduced.

``sections`` holds the dataclasses, their Enums and declared checks; ``load`` reads, overrides, resolves and
compares; ``constraints`` and ``coerce`` are the small engines both use.
"""

from dogbench.config.constraints import ConfigError, Each, Interval, Matches, NonEmpty, OneOf, Section, check_section
from dogbench.config.load import (
    EXECUTION_KEYS,
    absolute_path,
    apply_override,
    backbone_spec_table,
    computed_items,
    config_differences,
    from_mapping,
    load_config,
    parse_backbone_spec,
    parse_backbone_table,
    parse_value,
    resolve,
    saved_to_doc,
    validate,
)
from dogbench.config.sections import (
    DECODERS,
    DEFAULT_BACKBONES,
    DEVICE_PATTERN,
    FINETUNE_METHODS,
    FROZEN,
    HEAD_KINDS,
    METHODS,
    PREPROCESS_KEYS,
    PRUNERS,
    SECTIONS,
    BackboneConfig,
    Balance,
    BenchConfig,
    DataConfig,
    Decoder,
    EvalConfig,
    FeatureConfig,
    FinetuneConfig,
    HeadKind,
    Method,
    Precision,
    Pruner,
    ReportConfig,
    RunConfig,
    ShotsConfig,
    TrackConfig,
    TrackTo,
    Tta,
    TuneConfig,
    TuneMetric,
    crops_to_box,
    parse_shots,
    with_box_ablation,
)

__all__ = [
    "DECODERS", "DEFAULT_BACKBONES", "DEVICE_PATTERN", "EXECUTION_KEYS", "FINETUNE_METHODS", "FROZEN", "HEAD_KINDS",
    "METHODS", "PREPROCESS_KEYS", "PRUNERS", "SECTIONS",
    "BackboneConfig", "Balance", "BenchConfig", "ConfigError", "DataConfig", "Decoder", "Each", "EvalConfig",
    "FeatureConfig", "FinetuneConfig", "HeadKind", "Interval", "Matches", "Method", "NonEmpty", "OneOf", "Precision",
    "Pruner",
    "ReportConfig", "RunConfig", "Section", "ShotsConfig", "TrackConfig", "TrackTo", "Tta", "TuneConfig", "TuneMetric",
    "absolute_path", "apply_override", "backbone_spec_table", "check_section", "computed_items", "config_differences",
    "crops_to_box",
    "from_mapping", "load_config", "parse_backbone_spec", "parse_backbone_table", "parse_shots", "parse_value",
    "resolve", "saved_to_doc", "validate", "with_box_ablation",
]
