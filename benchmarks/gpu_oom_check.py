"""On a real GPU: largest_fitting_batch and the out-of-memory back-off under a capped CUDA memory budget.

    python benchmarks/gpu_oom_check.py MODEL CAP_GIB    (PYTHONPATH=src where dogbench is not installed)

Caps this process's CUDA allocator at CAP_GIB (torch.cuda.set_per_process_memory_fraction: allocations past
it raise torch.OutOfMemoryError as a full card would), then: which batch size auto picks; a 512-image batch
pushed through ModelRunner.__call__ (must back off, warn, and return the same rows as unsplit batches would).
"""

import sys
import time
import warnings

import numpy as np
import torch

from dogbench.backbones import load_backbone
from dogbench.config import BackboneConfig, Precision
from dogbench.features import ModelRunner

model, cap_gib = sys.argv[1], float(sys.argv[2])
dev = torch.device("cuda", torch.cuda.current_device())  # set_per_process_memory_fraction needs an index
total = torch.cuda.get_device_properties(dev).total_memory
bb = load_backbone(BackboneConfig(label=model, model=model, weights="random"))
runner = ModelRunner.create(bb, device=dev, precision=Precision.BF16)
free_auto = runner.largest_fitting_batch()
print(f"{model}: uncapped largest_fitting_batch = {free_auto}")
torch.cuda.empty_cache()
torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total, dev)
t = time.perf_counter()
capped = runner.largest_fitting_batch()
print(f"{model}: cap {cap_gib} GiB -> largest_fitting_batch = {capped} ({time.perf_counter() - t:.2f} s), "
      f"max allocated {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB")
gen = torch.Generator().manual_seed(0)
x = torch.randint(0, 256, (512, *bb.preprocess.input_size), dtype=torch.uint8, generator=gen).pin_memory()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    t = time.perf_counter()
    feats = runner(x)
    secs = time.perf_counter() - t
print(f"{model}: a 512-image batch under the cap -> {feats.shape}, max_rows now {runner.max_rows}, {secs:.2f} s, "
      f"warnings: {[str(w.message) for w in caught]}")
backed = runner.max_rows or 512
torch.cuda.set_per_process_memory_fraction(1.0, dev)
torch.cuda.empty_cache()
runner.max_rows = None
ref = np.concatenate([runner(x[i : i + backed]) for i in range(0, 512, backed)])
print(f"{model}: back-off rows vs batches of {backed} without a cap: max abs diff "
      f"{float(np.abs(ref - feats).max()):.3e} (feature magnitude {float(np.abs(ref).mean()):.3e}), "
      f"equal={np.array_equal(ref, feats)}")
