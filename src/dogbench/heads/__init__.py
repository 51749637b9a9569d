"""Classifier heads trained with torch on cached features, behind the scikit-learn contract.

``estimators`` holds the heads (logistic by L-BFGS, linear and MLP by AdamW), ``fit`` the data they train on and
how they train, ``files`` how they are saved and loaded with the identity of their backbone (no pickle).
"""

from dogbench.config import HEAD_KINDS, HeadKind
from dogbench.heads.estimators import (
    Activation,
    Head,
    LinearHead,
    LogisticHead,
    MLPHead,
    fitted_linear_head,
    head_class,
    make_head,
)
from dogbench.heads.files import (
    META_FILE,
    TENSORS_FILE,
    HeadFileError,
    HeadIdentityError,
    check_identity,
    head_identity,
    load_head,
    read_head_meta,
)
from dogbench.heads.fit import FeatureData

__all__ = [
    "HEAD_KINDS",
    "META_FILE",
    "TENSORS_FILE",
    "Activation",
    "FeatureData",
    "Head",
    "HeadFileError",
    "HeadIdentityError",
    "HeadKind",
    "LinearHead",
    "LogisticHead",
    "MLPHead",
    "check_identity",
    "fitted_linear_head",
    "head_class",
    "head_identity",
    "load_head",
    "make_head",
    "read_head_meta",
]
