"""Data: datasets (layouts, splits on samples), listing (the rows every listed layout feeds), labels (CSV, TSV,
text), hf (Hugging Face datasets), named (pets, cifar10, cub200, ... by name), content (file digests: the feature
cache's key), download (verify, resume, safe extract), images (decode, RGB, EXIF), uploads (files from strangers,
screened before decoding)."""

from dogbench.data.datasets import (
    IMAGE_EXTENSIONS,
    LAYOUTS,
    SPLITS,
    STANFORD_DOGS,
    DataNotFoundError,
    Dataset,
    DatasetLayoutError,
    Sample,
    detect_layout,
    display_names,
    open_dataset,
    relabel_to,
    sample_shots,
    select_classes,
    stratified_split,
)
from dogbench.data.images import ImageError, clamp_box, load_image, read_image
from dogbench.data.named import NAMED, imagenet_overlap
from dogbench.data.uploads import UPLOAD_FORMATS, Screened, UploadError, UploadLimits, screen_upload

__all__ = [
    "IMAGE_EXTENSIONS",
    "UPLOAD_FORMATS",
    "LAYOUTS",
    "NAMED",
    "SPLITS",
    "STANFORD_DOGS",
    "DataNotFoundError",
    "Dataset",
    "DatasetLayoutError",
    "ImageError",
    "Sample",
    "Screened",
    "UploadError",
    "UploadLimits",
    "clamp_box",
    "detect_layout",
    "display_names",
    "imagenet_overlap",
    "load_image",
    "open_dataset",
    "read_image",
    "relabel_to",
    "select_classes",
    "sample_shots",
    "screen_upload",
    "stratified_split",
]
