"""The two library-kernel formats of the serving figure: W8A8 on torch's FP8 GEMM, W4A16 on torch's INT4 GEMM.

Atom compares its W4A4 kernels with W8A8 (SmoothQuant) and W4A16 (AWQ / GPTQ) at the same memory. The engine runs
both for real, through kernels that ship with PyTorch, and each has a float reference (the same stored codes and
scales, dequantized, through F.linear) that the tests compare it with:

    FP8Linear      W8A8: weight FP8 e4m3 [N, K] with one fp32 scale per output channel, activation quantized per
                   token at run time (scale = amax / 448, one fused launch: kernels/fp8_rows.py),
                   y = torch._scaled_mm(x8, w8.T, s_x [M, 1], s_w [1, N])
                   (cuBLASLt rowwise-scaled FP8 GEMM; GPUs with FP8 tensor cores: Hopper, Ada).
    Int4Linear     W4A16: weight INT4, asymmetric, groups of 128 input channels, in the layout of
                   torch._weight_int4pack_mm (gpt-fast's "tinygemm": w = (q - 8) * scale + zero, bf16 scales and
                   zeros [K / G, N, 2]); activations stay bf16. On the CPU, torch's _for_cpu twin of both ops.

These are not Atom's format (atom_lab.QuantLinear holds that): no reorder, no keeper channels, round-to-nearest
levels; on the random weights of the serving benchmark the accuracy is irrelevant and only the bytes and the kernel
speed matter. Byte counts agree with serve/memory.py (W8A8: N K + 4 N; W4A16: N K / 2 + 4 N K / G).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# the per-token activation quantizer: one Triton launch on a GPU (the reference, bit-identical, on the CPU)
from atom_lab.kernels.fp8_rows import FP8, FP8_MAX, quantize_fp8_rows, quantize_fp8_rows_ref  # noqa: F401


class FP8Unsupported(RuntimeError):
    """torch._scaled_mm with rowwise scales is not available for this device / torch build."""


def _check_linear(linear, what: str) -> None:
    if not isinstance(linear, torch.nn.Linear):
        raise TypeError(f"{what} replaces a torch.nn.Linear, got {type(linear).__name__}.")


class FP8Linear(torch.nn.Module):
    """W8A8 (FP8 e4m3) replacement for nn.Linear(K -> N). real=True: torch._scaled_mm; False: float reference.

    Buffers: weight_fp8 float8_e4m3fn [N, K], weight_scale fp32 [1, N], bias (the linear's dtype) or None.
    forward(x [..., K]) -> [..., N] in x's dtype.
    """

    def __init__(self, linear: torch.nn.Linear, real: bool = True):
        super().__init__()
        _check_linear(linear, "FP8Linear")
        N, K = linear.weight.shape
        if K % 16 or N % 16:
            raise ValueError(f"FP8Linear needs in/out features divisible by 16 (cuBLASLt FP8), got [{N}, {K}].")
        w8, s = quantize_fp8_rows(linear.weight.detach())
        self.register_buffer("weight_fp8", w8)
        self.register_buffer("weight_scale", s.reshape(1, N).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features, self.real = K, N, real
        self._out_dtype = None  # the output dtype _scaled_mm accepted (some builds give rowwise scaling bf16 only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, K = x.shape[:-1], x.shape[-1]
        if K != self.in_features:
            raise ValueError(f"FP8Linear: input has {K} channels, expected {self.in_features}.")
        x8, sx = quantize_fp8_rows(x.reshape(-1, K))
        if self.real:
            y = self._scaled_mm(x8, sx, x.dtype)
        else:  # the same codes and scales, dequantized, in float32
            y = (x8.float() * sx) @ (self.weight_fp8.float() * self.weight_scale.T).T
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*lead, self.out_features)

    def _scaled_mm(self, x8, sx, dtype):
        out = self._out_dtype or dtype
        try:
            return torch._scaled_mm(x8, self.weight_fp8.T, scale_a=sx, scale_b=self.weight_scale, out_dtype=out)
        except RuntimeError as e:
            if out != torch.bfloat16:
                self._out_dtype = torch.bfloat16  # rowwise scaling with fp16 output refused: bf16 out, then cast
                return self._scaled_mm(x8, sx, dtype)
            # e.g. torch 2.11's CPU _scaled_mm takes per-tensor scales only (torch 2.13's CPU build takes rowwise)
            raise FP8Unsupported(f"FP8Linear(real=True): this torch {torch.__version__} build refuses a rowwise-"
                                 f"scaled FP8 GEMM on {x8.device.type} ({str(e).splitlines()[0][:160]}); use a GPU "
                                 "with FP8 tensor cores, a newer torch, or FP8Linear(real=False), the float "
                                 "reference of the same codes.") from e


def int4_levels(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric INT4 per group of `group` input channels (tinygemm's convention).

    w float [N, K] -> (q int32 [N, K] in 0..15, scale fp32 [N, K / group], zero fp32 [N, K / group]) with
    w ~ (q - 8) * scale + zero, zero = min + 8 * scale.
    """
    N, K = w.shape
    g = w.float().reshape(N, K // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(N, K)
    return q, scale, lo + 8 * scale


class Int4Linear(torch.nn.Module):
    """W4A16 replacement for nn.Linear(K -> N), groups of `group` input channels, bf16 activations.

    real=True: torch._weight_int4pack_mm (CUDA) / _weight_int4pack_mm_for_cpu; the weight buffer is the op's own
    packed layout. real=False: the float reference, which keeps the levels as uint8 codes [N, K / 2] (two per byte)
    instead. Both hold scales_zeros bf16 [K / group, N, 2]. forward(x [..., K]) -> [..., N] in x's dtype.
    """

    INNER_K_TILES = 8

    def __init__(self, linear: torch.nn.Linear, group: int = 128, real: bool = True):
        super().__init__()
        _check_linear(linear, "Int4Linear")
        N, K = linear.weight.shape
        if group not in (32, 64, 128, 256) or K % group or K % (16 * self.INNER_K_TILES) or N % 8:
            raise ValueError(f"Int4Linear needs group in 32/64/128/256 dividing K, K % {16 * self.INNER_K_TILES} "
                             f"== 0 and N % 8 == 0 (torch's int4 layout); got [{N}, {K}], group={group}.")
        q, scale, zero = int4_levels(linear.weight.detach(), group)
        self.register_buffer("scales_zeros", torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
                             .to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features, self.group, self.real = K, N, group, real
        self.cpu = linear.weight.device.type == "cpu"
        if real:
            if self.cpu:
                packed = torch._convert_weight_to_int4pack_for_cpu(q, self.INNER_K_TILES)
            else:
                packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8),
                                                           self.INNER_K_TILES)
            self.register_buffer("weight_int4", packed)
        else:
            self.register_buffer("codes", (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8))

    def dequantized_weight(self) -> torch.Tensor:
        """Reference only: float32 [N, K] = (q - 8) * scale + zero from the stored codes, scales and zeros."""
        c = self.codes.to(torch.int32)
        q = torch.stack([c >> 4, c & 15], -1).reshape(self.out_features, self.in_features).float()
        sz = self.scales_zeros.float().transpose(0, 1)  # [N, K / G, 2]
        q = q.view(self.out_features, -1, self.group)
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, K = x.shape[:-1], x.shape[-1]
        if K != self.in_features:
            raise ValueError(f"Int4Linear: input has {K} channels, expected {self.in_features}.")
        x2 = x.reshape(-1, K)
        if self.real:
            op = torch._weight_int4pack_mm_for_cpu if self.cpu else torch._weight_int4pack_mm
            y = op(x2.to(torch.bfloat16).contiguous(), self.weight_int4, self.group, self.scales_zeros)
        else:
            y = F.linear(x2.to(torch.bfloat16).float(), self.dequantized_weight())  # the kernel reads bf16 x
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*lead, self.out_features)


BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")


@torch.no_grad()
def convert_model(model, weights: str, real: bool = True, group: int = 128):
    """Replace every decoder block's linear layers in place: weights "w8a8" (FP8Linear) or "w4a16" (Int4Linear).
    Embeddings, norms and the LM head stay in the model's dtype (as in memory.py). Returns the model."""
    if weights not in ("w8a8", "w4a16"):
        raise ValueError(f"weights={weights!r}: convert_model builds 'w8a8' or 'w4a16' (W4A4 is atom_lab.QuantLinear).")
    for block in model.model.layers:
        for name in BLOCK_LINEARS:
            parent, _, child = name.rpartition(".")
            lin = block.get_submodule(name)
            new = FP8Linear(lin, real) if weights == "w8a8" else Int4Linear(lin, group, real)
            setattr(block.get_submodule(parent), child, new)
            del lin
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return model
