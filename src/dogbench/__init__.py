"""dogbench: does a Vision Transformer beat a ResNet50 on your fine-grained images?

``dogbench.load_run(path)`` loads a finished run's models for ``predict`` / ``predict_proba`` (imported on first
use, so ``import dogbench`` stays light).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_run"]


def __getattr__(name: str) -> Any:
    if name == "load_run":
        from dogbench.inference import load_run

        return load_run
    raise AttributeError(f"module 'dogbench' has no attribute {name!r}")
