"""Features: the runner (the one forward path), extraction (batching, resumable chunks) and the locked cache."""

from dogbench.features.cache import CacheError, FeatureCache, cache_key
from dogbench.features.extract import FeatureSet, extract_features, feature_key, feature_settings
from dogbench.features.runner import ImageDataset, ModelRunner, effective_decoder, iter_batches

__all__ = [
    "CacheError",
    "FeatureCache",
    "FeatureSet",
    "ImageDataset",
    "ModelRunner",
    "cache_key",
    "effective_decoder",
    "extract_features",
    "feature_key",
    "feature_settings",
    "iter_batches",
]
