"""The GPUs bigvit knows: vendor datasheet figures, for the planner's roofline and the trainer's MFU.

Figures are NVIDIA's datasheets for the SXM parts and the DGX reference systems built from them:
- A100: "NVIDIA A100 Tensor Core GPU" datasheet (BF16 312 TFLOPS dense, 624 with sparsity; 40 GB HBM2 at
  1,555 GB/s, 80 GB HBM2e at 2,039 GB/s; NVLink 600 GB/s) and the DGX A100 datasheet (8 GPUs, 8 × 200 Gb/s
  HDR InfiniBand ConnectX-6 compute ports).
- H100 SXM: "NVIDIA H100 Tensor Core GPU" datasheet (BF16 1,979 TFLOPS with sparsity, so 989.5 dense;
  80 GB HBM3 at 3.35 TB/s; NVLink 900 GB/s) and the DGX H100 datasheet (8 GPUs, 8 × 400 Gb/s ConnectX-7).
- H200 SXM: "NVIDIA H200 Tensor Core GPU" datasheet (BF16 1,979 TFLOPS with sparsity; 141 GB HBM3e at
  4.8 TB/s; NVLink 900 GB/s) and the DGX H200 datasheet (8 GPUs, 8 × 400 Gb/s ConnectX-7).

NVLink figures in datasheets are both directions added; collectives are limited by one direction, so
the table keeps half. Memory capacities are the datasheet's "GB", which for these parts are binary
(an H100 80GB reports 81,559 MiB to nvidia-smi, a little under 80 GiB): the planner reads them as GiB
and subtracts `plan.reserved_gib` for what CUDA and NCCL take before any tensor exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigvit.errors import ConfigError


@dataclass(frozen=True)
class GPU:
    device_name: str  # the fragment torch.cuda.get_device_name() contains, e.g. "H100"
    peak_bf16_tflops: float  # dense tensor-core bf16; fp32 matmuls run as TF32 at half this
    hbm_gib: float
    hbm_gb_per_s: float  # HBM bandwidth, 1e9 bytes/s
    nvlink_gb_per_s: float  # per GPU, one direction (datasheet total / 2)
    nic_gbit_per_s: float  # inter-node network per GPU in the reference system, Gb/s, one direction
    gpus_per_node: int  # in the reference system


GPUS: dict[str, GPU] = {
    "a100_40gb": GPU("A100", 312.0, 40, 1555, 600 / 2, 200, 8),
    "a100_80gb": GPU("A100", 312.0, 80, 2039, 600 / 2, 200, 8),
    "h100": GPU("H100", 1979 / 2, 80, 3350, 900 / 2, 400, 8),
    "h200": GPU("H200", 1979 / 2, 141, 4800, 900 / 2, 400, 8),
}

# Dense bf16 peak (TFLOP/s) by device-name fragment: the trainer's MFU lookup, a view of GPUS.
PEAK_BF16_TFLOPS = {gpu.device_name: gpu.peak_bf16_tflops for gpu in GPUS.values()}


def gpu_spec(name: str) -> GPU:
    """The table entry for `cluster.gpu`; a ConfigError names the value and the valid ones."""
    if name not in GPUS:
        raise ConfigError(f"cluster.gpu={name!r} is not one of {sorted(GPUS)}")
    return GPUS[name]


@dataclass(frozen=True)
class Cluster:
    """`gpus` GPUs of one kind in nodes of `gpus_per_node`, NVLink inside a node, a network between."""

    gpus: int
    gpu_name: str
    gpu: GPU
    gpus_per_node: int
    nic_gbit_per_s: float

    @property
    def nodes(self) -> int:
        return max(self.gpus // self.gpus_per_node, 1)

    def link_bytes_per_s(self, extent: int) -> float:
        """Line rate per GPU, one direction, of a collective whose group spans `extent` consecutive ranks:
        NVLink within a node, else the GPU's share of the network (rings cross nodes through each GPU's NIC)."""
        if extent <= self.gpus_per_node:
            return self.gpu.nvlink_gb_per_s * 1e9
        return self.nic_gbit_per_s * 1e9 / 8


def build_cluster(
    gpus, gpu: str, gpus_per_node: int | None = None, nic_gbit_per_s: float | None = None
) -> Cluster:
    """A Cluster from `cluster.*` config values; None takes the GPU's reference system (DGX)."""
    spec = gpu_spec(gpu)
    per_node = int(gpus_per_node or spec.gpus_per_node)
    if not isinstance(gpus, int) or gpus < 1 or per_node < 1:
        raise ConfigError(
            f"cluster.gpus={gpus!r} and cluster.gpus_per_node={per_node} must be positive integers"
        )
    if gpus > per_node and gpus % per_node:
        raise ConfigError(
            f"cluster.gpus={gpus} is not a whole number of nodes of cluster.gpus_per_node={per_node}"
        )
    nic = float(nic_gbit_per_s or spec.nic_gbit_per_s)
    return Cluster(gpus, gpu, spec, per_node, nic)
