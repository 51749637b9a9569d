"""Where a backbone looks: attention rollout for ViTs, Grad-CAM for CNNs, as overlays on the model's input.

``maps`` computes the heatmaps and explains one photo with one model (``predict``'s calibrated top-3 with it);
``figures`` writes a run's overlays, side-by-side figures and ``explanations.json``.
"""

from dogbench.explain.figures import explain_run, overlay, side_by_side
from dogbench.explain.maps import (
    GRAD_CAM,
    METHODS,
    ROLLOUT,
    ExplainError,
    Explanation,
    HeadFusion,
    attention_rollout,
    box_in_input,
    explain_image,
    explain_pixels,
    grad_cam,
    input_image,
)

__all__ = [
    "GRAD_CAM",
    "METHODS",
    "ROLLOUT",
    "Explanation",
    "ExplainError",
    "HeadFusion",
    "attention_rollout",
    "box_in_input",
    "explain_image",
    "explain_pixels",
    "explain_run",
    "grad_cam",
    "input_image",
    "overlay",
    "side_by_side",
]
