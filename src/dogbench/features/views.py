"""Test-time augmentation's views of a model-input batch: which views ``evaluate.tta`` names, and each view's
pixels. An image's probabilities are the mean over its views of the calibrated probabilities
(``evaluate.average_views``), in test scoring, ``predict``, the demo and the API alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dogbench.config import ConfigError, Tta


@dataclass(frozen=True)
class View:
    """One view of the centre-cropped model input: as it is, or mirrored left to right."""

    name: str  # "plain" or "flip": part of the feature-cache key of a view other than the plain one
    mirror: bool

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The view of a uint8 (B, 3, H, W) batch (the mirror of the centre crop is the centre crop of the mirror)."""
        assert x.ndim == 4, f"a view takes a (B, 3, H, W) batch, got {tuple(x.shape)}"
        return torch.flip(x, dims=[3]) if self.mirror else x


PLAIN = View("plain", mirror=False)
FLIP = View("flip", mirror=True)
SUPPORTED = (Tta.NONE, Tta.FLIP)


def views_for(tta: Tta | str) -> tuple[View, ...]:
    """The views ``evaluate.tta`` averages over, the plain view first; ConfigError for one not built yet."""
    tta = Tta(tta)
    if tta == Tta.NONE:
        return (PLAIN,)
    if tta == Tta.FLIP:
        return (PLAIN, FLIP)
    raise ConfigError(f"evaluate.tta = '{tta}' is not available yet (ten-crop views are not built); valid choices: "
                      f"{', '.join(t.value for t in SUPPORTED)}")
