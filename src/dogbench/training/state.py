"""The training state: every RNG, written atomically with the weights, optimizer, scheduler and EMA into the
state file its caller names (``TrainFiles``), and read back ``weights_only``."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dogbench.atomic import atomic_write_bytes
from dogbench.training.recipe import TrainingError

STATE_FORMAT = 1
EPOCH_FIELD = "{epoch}"  # where the epoch goes in ``TrainFiles.best_template``'s file name


@dataclass(frozen=True)
class TrainFiles:
    """The files of one training run, named by its caller (the run folder's owner): the state, the params
    record, and the best epoch's weights (``best_template``'s name holds ``{epoch}``)."""

    state: Path
    params: Path
    best_template: Path

    def best(self, epoch: int) -> Path:
        """The weights file of best epoch ``epoch`` (1-based)."""
        return self.best_template.with_name(self.best_template.name.replace(EPOCH_FIELD, str(epoch)))

    def best_files(self) -> Iterator[Path]:
        """Every best-epoch weights file there now, whichever epoch wrote it."""
        return self.best_template.parent.glob(self.best_template.name.replace(EPOCH_FIELD, "*"))


def rng_state(device: torch.device) -> dict[str, Any]:
    """Torch's (CPU and ``device``'s), Python's and numpy's global RNG states, as plain values and tensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_version":
            random.getstate()[0], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """The global RNGs back to ``state`` (from ``rng_state``)."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate((state["python_version"], tuple(state["python"]), None))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def save_state(path: Path, state: dict[str, Any]) -> None:
    """``state`` written atomically: a kill leaves the previous state whole."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_state(path: Path) -> dict[str, Any]:
    """A training state written by ``train`` (tensors and plain values only: ``weights_only``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same problem
        raise TrainingError(f"{path} is not a readable training state ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); delete it to train from the start"
                            ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path} is not a dogbench training state (format {STATE_FORMAT}); delete it to train "
                            "from the start")
    return state


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict as contiguous CPU copies (what safetensors writes)."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
