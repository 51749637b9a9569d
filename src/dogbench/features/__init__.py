"""Features: the runner (the one forward path), extraction (batching, resumable chunks) and the locked cache."""

from dogbench.features.cache import CacheError, FeatureCache, cache_key
from dogbench.features.extract import FeatureSet, extract_features, feature_key, feature_settings
from dogbench.features.runner import ImageDataset, ModelRunner, effective_decoder, iter_batches
from dogbench.features.views import FLIP, PLAIN, View, views_for

__all__ = [
    "FLIP",
    "PLAIN",
    "CacheError",
    "FeatureCache",
    "FeatureSet",
    "ImageDataset",
    "ModelRunner",
    "View",
    "cache_key",
    "effective_decoder",
    "extract_features",
    "feature_key",
    "feature_settings",
    "iter_batches",
    "views_for",
]
