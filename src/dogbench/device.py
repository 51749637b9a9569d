"""Device and precision policy in one place: which device, which dtype, memory format, decode workers, exact fp32.

A command resolves one ``Policy`` from its settings and passes it down; every stage that runs a model
(extraction, validation, test scoring, prediction, explanations, heads, training, benchmarks) reads it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch

from dogbench.config import Precision
from dogbench.errors import DogbenchError

DTYPES = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DogbenchError(f"Unknown device '{name}'. Valid: auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DogbenchError(f"Device '{name}' requested but CUDA is not available here. Valid here: {valid_here()}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DogbenchError(
            f"Device '{name}' requested but this machine has {torch.cuda.device_count()} CUDA device(s). "
            f"Valid here: {valid_here()}"
        )
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DogbenchError(f"Device '{name}' requested but MPS is not available here. Valid here: {valid_here()}")
    return device


def valid_here() -> str:
    """The device names this machine accepts, for error messages."""
    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return ", ".join(names)


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    """AUTO -> bf16 on a GPU with bf16 support, else fp32 (CPU bf16 without AMX is slower than fp32)."""
    if precision is not Precision.AUTO:
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return Precision.BF16
    return Precision.FP32


def fast_bf16_matmul(device: torch.device) -> bool:
    """Whether bf16 matrix products beat fp32 on ``device``: a GPU with bf16 support, or a CPU with AVX-512 BF16
    or AMX instructions (1.7-2.2x per MLP-head epoch on AVX-512 BF16; docs/benchmarks/heads-and-tuning.md)."""
    if device.type == "cuda":  # native bf16 from Ampere (compute capability 8) on; older cards emulate it
        return torch.cuda.get_device_properties(device).major >= 8
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def train_precision(device: torch.device) -> Precision:
    """The precision of training steps (heads and fine-tuning) under ``auto``: bf16 where bf16 matmuls are fast."""
    return Precision.BF16 if fast_bf16_matmul(device) else Precision.FP32


@dataclass(frozen=True)
class Policy:
    """How a command runs its models, decided once: ``precision`` for every forward pass that produces a figure
    (extraction, validation, test, predict, explain, serve, export), ``train_precision`` for training steps."""

    device: torch.device
    precision: Precision
    train_precision: Precision

    @classmethod
    def resolve(cls, device: str = "auto", precision: Precision | str = Precision.AUTO,
                train: Precision | str = Precision.AUTO) -> Policy:
        """Names checked against this machine; ``auto`` precisions resolved for the device."""
        torch_device = resolve_device(device)
        train = Precision(train)
        return cls(torch_device, resolve_precision(Precision(precision), torch_device),
                   train_precision(torch_device) if train is Precision.AUTO else train)

    def memory_format(self, *, is_vit: bool) -> torch.memory_format:
        """channels_last for CNNs (oneDNN and cuDNN pick their NHWC kernels); ViTs gain nothing from it."""
        return torch.preserve_format if is_vit else torch.channels_last

    def train_autocast(self, precision: Precision | None = None) -> AbstractContextManager[object]:
        """Training steps' autocast in ``precision`` (default ``train_precision``); fp32 keeps torch's TF32
        defaults, as timm's train.py does: exactness is for the forward passes that produce figures."""
        dtype = DTYPES.get(precision or self.train_precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def autocast(self, precision: Precision | None = None) -> AbstractContextManager[object]:
        """Autocast in ``precision`` (default: the inference precision); fp32 runs exact (no TF32 on CUDA)."""
        precision = precision or self.precision
        dtype = DTYPES.get(precision)
        if dtype is None:
            return exact_fp32(self.device, precision)
        return torch.autocast(self.device.type, dtype=dtype)

    @contextmanager
    def inference(self) -> Iterator[None]:
        """The forward passes that produce figures: inference mode and the recorded precision."""
        with torch.inference_mode(), self.autocast():
            yield


def accelerator_indices(device: torch.device) -> list[int]:
    """The CUDA device index ``device`` means ([] off CUDA): for RNG forks and DDP's ``device_ids``."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_workers(num_workers: int | None, device: torch.device) -> int:
    """Worker processes: 0 on CPU (decode runs between forward passes on every core), cores - 1 on a GPU."""
    if num_workers is not None:
        return num_workers
    return 0 if device.type == "cpu" else max(1, min(8, cpu_cores() - 1))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({os.cpu_count()} cores)" if device.type == "cpu" else device.type


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def exact_fp32(device: torch.device, precision: Precision) -> Iterator[None]:
    """fp32 means fp32: no TF32 matmuls or convolutions on CUDA (torch allows TF32 convolutions by default)."""
    if device.type != "cuda" or precision is not Precision.FP32:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
