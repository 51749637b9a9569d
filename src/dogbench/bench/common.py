"""What every bench shares: the images it times, the machine it ran on, and the printed table."""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from dogbench.data import Dataset
from dogbench.device import cpu_cores
from dogbench.results import text_table


def bench_images(dataset: Dataset, n: int) -> Dataset:
    """``n`` samples spread evenly over the dataset in sample-id order (every class, both splits)."""
    samples = sorted(dataset.samples, key=lambda s: s.sample_id)
    step = max(1, len(samples) // n)
    return dataclasses.replace(dataset, samples=tuple(samples[::step][:n]))






def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)



def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value



def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0], "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cores": cpu_cores(), "platform": platform.platform(), "cpu": _cpu_model(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return info



def loadavg() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None



def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()



def table_lines(title: str, machine: dict[str, Any], repeats: int, header: list[str], body: list[list[str]]
                ) -> list[str]:
    """A bench's printed table: the machine and load in a title line, then aligned columns."""
    return [
        f"{title}: {machine.get('cpu')} / {machine.get('gpu', 'no GPU')}, torch {machine['torch']}, "
        f"{machine['threads']} threads; medians of {repeats} rounds; load average "
        f"{machine.get('loadavg_1min_before')} before, {machine.get('loadavg_1min_after')} after",
        *text_table(header, body),
    ]
