"""Throughput, MFU and memory: the device-specific parts behind one small function each."""

from __future__ import annotations

import gc
import resource
import sys
import time
import warnings

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment; fp32 matmuls run on TF32 at half this.
from bigvit.scaling.hardware import PEAK_BF16_TFLOPS


def measure_matmul_flops(
    dtype: torch.dtype, device: torch.device, size: int = 1024, seconds: float = 0.3
) -> float:
    """Achievable matmul FLOP/s of this process (its threads, its dtype), timed over ~`seconds`."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # warm-up: thread pool and kernels
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * reps / (time.perf_counter() - start)


def peak_flops(device: torch.device, dtype: torch.dtype, configured_tflops: float | None = None) -> float:
    """Per-device peak FLOP/s for MFU: configured, else a known GPU's datasheet, else measured here."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, tflops in PEAK_BF16_TFLOPS.items():
            if fragment in name:
                return tflops * 1e12 / (2 if dtype == torch.float32 else 1)
    return measure_matmul_flops(dtype, device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA allocator peak on GPUs, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def live_tensor_bytes(device: torch.device) -> int:
    """Bytes held by tensors now: the CUDA allocator's count on GPUs; on CPU, the distinct storages of
    all live tensors (parameters, gradients, optimizer state, buffers), found through the garbage collector."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    storages = {}
    with warnings.catch_warnings():  # isinstance() touches deprecated lazy attributes of some modules
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        tensors = [obj for obj in objects if isinstance(obj, torch.Tensor)]
    for tensor in tensors:
        try:
            if tensor.is_meta or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        except RuntimeError:  # wrapper subclasses (DTensor) and storages FSDP has freed
            continue
    return sum(storages.values())


class Throughput:
    """Images/s, MFU and HFU over the steps since the last report.

    MFU counts the model's FLOPs (forward + backward, PaLM's definition); HFU also counts what the
    hardware executes: recomputation under activation checkpointing, padding of sharded sequences.
    Steps may differ in images and FLOPs (progressive resizing), so each step reports its own.
    """

    def __init__(self, peak_flops_total: float):
        self.peak = peak_flops_total
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.images, self.model_flops, self.hardware_flops = time.perf_counter(), 0, 0, 0.0, 0.0

    def step(self, images: int, model_flops: float, hardware_flops: float) -> None:
        """One step over `images` images costing `model_flops` (and `hardware_flops` executed) in all."""
        self.steps += 1
        self.images += images
        self.model_flops += model_flops
        self.hardware_flops += hardware_flops

    def report(self) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        report = {
            "images_per_sec": self.images / elapsed,
            "step_time": elapsed / max(self.steps, 1),
            "mfu": self.model_flops / elapsed / self.peak,
            "hfu": self.hardware_flops / elapsed / self.peak,
        }
        self.reset()
        return report
