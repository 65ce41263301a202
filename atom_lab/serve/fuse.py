"""Fused projections: q/k/v as ONE GEMM, gate/up as ONE GEMM, as serving engines do (vLLM's QKVParallelLinear and
MergedColumnParallelLinear, nano-vllm's the same).

At decode batch sizes a GEMM is too small to fill the GPU: on the H200 our W4A4 kernel runs Llama-2-7B's o_proj
shape (4096 x 4096) at M = 64 at 0.49x cuBLAS bf16 but the stacked q|k|v shape (4096 x 12288) at 0.77x
(benchmarks/results/gemm_h200.json): three times the output tiles, one launch. The same holds, less, for cuBLAS.
So the engine stacks the weight rows of the layers that read one activation and runs one GEMM; each original
layer becomes a `Part` returning its column slice of that output. The stored bytes are the same (the parts hold
no weights), the arithmetic per output element is the same (a row of the stacked weight is the layer's row).

Formats: torch.nn.Linear (FP16/BF16), FP8Linear (W8A8), and atom_lab's packed W4A4 QuantLinear on the triton
backend; other layers (W4A16's tinygemm layout, the reference backend) are left as they are.
"""
from __future__ import annotations

import copy

import torch

from atom_lab.qlinear import QuantLinear
from atom_lab.serve.lowbit import FP8Linear

GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))
# the buffers of each layer type with one entry per output channel, and the dimension that runs over them
OUTPUT_BUFFERS = {QuantLinear: {"packed_q4": 0, "packed_s4": 0, "packed_q8": 0, "packed_s8": 0, "bias": 0},
                  FP8Linear: {"weight_fp8": 0, "weight_scale": 1, "bias": 0}}


class Stacked(torch.nn.Module):
    """One linear whose output rows are several layers' rows; computes once per input, hands out slices.

    forward(x [..., K]) -> [..., N_total]; slice(x, i) -> layer i's [..., N_i] (a view of that output). The output
    is kept until every part took its slice (or a different input arrives), so one GEMM serves all of them.
    """

    def __init__(self, linear: torch.nn.Module, sizes: list[int]):
        super().__init__()
        self.linear = linear
        self.bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self._key = self._version = self._y = None
        self._left = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def slice(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if self._left == 0 or x is not self._key or x._version != self._version:
            self._key, self._version, self._y = x, x._version, self.linear(x)
            self._left = len(self.bounds) - 1
        y = self._y[..., self.bounds[i]: self.bounds[i + 1]]
        self._left -= 1
        if self._left == 0:
            self._key = self._y = None  # nothing kept alive between steps
        return y


class Part(torch.nn.Module):
    """Stands where one of the stacked layers stood: forward(x) = that layer's output, a slice of the stacked GEMM.
    in_features / out_features / name as the original layer had (what the decoder code reads)."""

    def __init__(self, stacked: Stacked, i: int, original: torch.nn.Module):
        super().__init__()
        self._stacked = (stacked,)  # a tuple: the Stacked module is registered once, on the parent
        self.i = i
        self.in_features = original.in_features
        self.out_features = original.out_features
        self.out_bits = getattr(original, "out_bits", 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._stacked[0].slice(x, self.i)


@torch.no_grad()
def _stack_linear(layers: list[torch.nn.Module]) -> torch.nn.Module | None:
    """One module computing the layers' outputs side by side, of the same kind as they are, or None."""
    first = layers[0]
    if any(type(m) is not type(first) or getattr(m, "out_bits", 16) < 16 for m in layers):
        return None
    if type(first) is torch.nn.Linear:
        w = torch.cat([m.weight for m in layers])
        out = torch.nn.Linear(w.shape[1], w.shape[0], bias=first.bias is not None, device=w.device, dtype=w.dtype)
        out.weight.copy_(w)
        if first.bias is not None:
            out.bias.copy_(torch.cat([m.bias for m in layers]))
        return out.requires_grad_(False)
    if isinstance(first, QuantLinear) and not (first.is_packed and first.backend == "triton" and all(
            m.shared_input is first.shared_input and torch.equal(m.kernel_index, first.kernel_index)
            for m in layers)):
        return None  # stacked, they must read one quantized activation: same reorder, group, keeper, clip
    if type(first) not in OUTPUT_BUFFERS:
        return None
    out = copy.copy(first)  # the same module with its per-output-channel buffers stacked
    out._buffers = dict(first._buffers, **{n: torch.cat([m._buffers[n] for m in layers], dim=d)
                                           for n, d in OUTPUT_BUFFERS[type(first)].items()
                                           if first._buffers.get(n) is not None})
    out.out_features = sum(m.out_features for m in layers)
    if isinstance(first, QuantLinear):
        out.name = "+".join(m.name.rsplit(".", 1)[-1] for m in layers)
    return out


@torch.no_grad()
def fuse_projections(model) -> int:
    """Stack q/k/v and gate/up of every decoder block of a Llama-architecture model, in place (module docstring).
    Returns how many stacked groups the model holds now (also those of an earlier call: a model is stacked once;
    0: nothing its layers allow)."""
    for block in model.model.layers:
        for parent_name, names in GROUPS:
            parent = getattr(block, parent_name, None)
            layers = [getattr(parent, a, None) for a in names]
            if parent is None or any(m is None or isinstance(m, Part) for m in layers):
                continue
            linear = _stack_linear(layers)
            if linear is None:
                continue
            stacked = Stacked(linear, [m.out_features for m in layers])
            parent.add_module("stacked_" + "_".join(a.split("_")[0] for a in names), stacked)
            for i, (a, m) in enumerate(zip(names, layers)):
                setattr(parent, a, Part(stacked, i, m))
                _share_rows(m, linear, stacked.bounds[i], stacked.bounds[i + 1])
    return sum(isinstance(m, Stacked) for m in model.modules())


def _share_rows(m: torch.nn.Module, stacked: torch.nn.Module, r0: int, r1: int) -> None:
    """Point an original layer's per-output-channel buffers at its part of the stacked ones (views: no second copy
    in memory). The W4A4 backend keeps references to the originals (the fused RMSNorm reads their reorder index,
    FusedMLP its unfused module), which would otherwise hold the weights twice."""
    for name, dim in OUTPUT_BUFFERS.get(type(m), {}).items():
        if m._buffers.get(name) is not None:
            m._buffers[name] = stacked._buffers[name].narrow(dim, r0, r1 - r0)
