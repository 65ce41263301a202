"""GPU profiles for the cost model: peak throughput per operand format, memory bandwidth, memory, interconnect.

H200: MEASURED on the project's GPU machine (../shared/NOTES.md, "The H200", 2026-12-02; medians of the ranges):
  copy 4.19-4.25 TB/s (bytes read + written), cuBLAS bf16 737-779 TFLOP/s, torch._int_mm 830-886 TOP/s,
  torch._scaled_mm FP8 rowwise 1251-1366 TFLOP/s at 8192^3. No native INT4 MMA on Hopper (mma.sync s4 is
  emulated: 52.5 TOPS on the H100), so 4-bit operands run on the INT8 / FP8 tensor cores after an unpack.
Datasheet profiles (dense peaks, no sparsity):
  H100 SXM  NVIDIA H100 Tensor Core GPU datasheet: BF16 989.4 TFLOPS, FP8 1978.9, INT8 1978.9 TOPS, 3.35 TB/s
            HBM3, 80 GB, NVLink 900 GB/s. Measured here (NOTES.md, H100 80GB HBM3): bf16 710-750, int8 830-915,
            fp8 1150-1250, copy 3.0 TB/s: 0.74 / 0.44 / 0.61 / 0.90 of the datasheet.
  A100 SXM  NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): BF16 312 TFLOPS, INT8 624 TOPS, INT4 1248 TOPS
            (native INT4 MMA on Ampere), 2.039 TB/s HBM2e, NVLink 600 GB/s; no FP8.
  RTX 4090  NVIDIA Ada Lovelace architecture whitepaper (v2.1, appendix A, GeForce RTX 4090): FP16 tensor with FP32
            accumulate 165.2 TFLOPS, FP8 (FP32 accumulate) 330.3, INT8 660.6 TOPS, INT4 1321.2 TOPS (native INT4:
            what Atom's kernels used), 1008 GB/s GDDR6X, 24 GB, no NVLink (PCIe 4.0 x16, 32 GB/s each way).
Datasheet peaks are not reached by real kernels: `derate` scales them by what the H100 measured against its own
datasheet (bf16 0.74, int 0.44-0.61, bandwidth 0.90), an ASSUMPTION for the three GPUs we could not measure.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bandwidth: float           # bytes / s (a copy's read + written)
    bf16: float                # FLOP / s on the tensor cores
    int8: float                # OP / s
    fp8: float | None          # FLOP / s, None = no FP8 tensor cores
    int4: float | None         # OP / s, None = no native INT4 MMA (Hopper)
    interconnect: float        # bytes / s per GPU per direction (NVLink, or PCIe)
    source: str

    def peak(self, operand: str) -> float:
        """Peak of the tensor-core path a format's GEMM uses ('bf16', 'int8', 'fp8', 'int4')."""
        value = getattr(self, operand)
        if value is None:
            raise ValueError(f"{self.name} has no {operand} tensor-core path.")
        return value

    def derate(self, compute: float = 0.74, integer: float = 0.52, bandwidth: float = 0.90) -> GPU:
        """A copy with datasheet peaks scaled to what kernels reach (see the module docstring)."""
        f = lambda v, r: None if v is None else v * r  # noqa: E731
        return replace(self, bandwidth=self.bandwidth * bandwidth, bf16=self.bf16 * compute,
                       int8=self.int8 * integer, fp8=f(self.fp8, integer), int4=f(self.int4, integer),
                       source=self.source + f"; derated x{compute} (bf16), x{integer} (int/fp8), x{bandwidth} "
                                            "(bandwidth) as the H100 measured against its datasheet (assumed)")


T = 1e12
H200 = GPU("H200", 139.8, 4.22e12, 758 * T, 858 * T, 1300 * T, None, 450e9,
           "measured 2026-12-02 (../shared/NOTES.md, The H200); NVLink 900 GB/s bidirectional from the datasheet")
H100 = GPU("H100 SXM", 80, 3.35e12, 989.4 * T, 1978.9 * T, 1978.9 * T, None, 450e9,
           "NVIDIA H100 datasheet").derate()
A100 = GPU("A100 SXM 80GB", 80, 2.039e12, 312 * T, 624 * T, None, 1248 * T, 300e9,
           "NVIDIA A100 datasheet").derate()
RTX4090 = GPU("RTX 4090", 24, 1.008e12, 165.2 * T, 660.6 * T, 330.3 * T, 1321.2 * T, 32e9,
              "NVIDIA Ada Lovelace whitepaper").derate()
GPUS = {g.name: g for g in (H200, H100, A100, RTX4090)}
