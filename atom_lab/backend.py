"""set_backend: run a quantized model on the float reference or on the Triton kernels, fusing what Atom fuses.

On backend="triton" every packed QuantLinear computes y = w4a4_gemm(PackedAtom activation, PackedAtom weight)
+ bias. Where a llama / mistral / qwen2 decoder block allows it, the quantization of each activation is fused into
the kernel that produces it, as in Atom:

    residual --rmsnorm_quantize--> ONE PackedAtom --> q_proj, k_proj, v_proj      (input_layernorm replaced)
    attention output --reorder_quantize--> o_proj                                 (QuantLinear on its own)
    residual --rmsnorm_quantize--> ONE PackedAtom --> gate_proj, up_proj          (post_attention_layernorm replaced)
    gate_out, up_out --silu_mul_quantize--> PackedAtom --> down_proj              (mlp replaced by FusedMLP)
                     (silu_mul_rotate_quantize when down_proj's input is rotated online: atom_lab.rotation)

The mechanism: a replaced norm (RMSNormQuantize) runs the fused kernel, puts its PackedAtom into a SharedInput that
q/k/v (resp. gate/up) hold, and returns a placeholder tensor of the normed activation's shape. The attention module
of transformers only reads that tensor's shape and passes the very same object to q_proj, k_proj and v_proj, which
find it in the SharedInput and take the PackedAtom: the activation is quantized once and never exists in float.
The placeholder holds NaN, so anything else that read it would fail loudly instead of computing silently wrong.
The residual adds stay in PyTorch.

Numerics: the kernels compute RMSNorm and SiLU(gate) * up in float32 (kernels/act_quant.py); Hugging Face's bf16/fp16
modules round to the model dtype in between. On a float32 model the two differ by float32 rounding only. The
KV cache (config.kv_bits < 16) is fake-quantized in float exactly as on the reference backend (the INT4 KV-cache
kernel is a later chapter). The state_dict keys and tensors are the same on both backends (the replacements hold
the original norm weight and linears under the same names), so save/load does not care which one is active.
"""
from __future__ import annotations

import torch

from atom_lab.kernels import rmsnorm_quantize, silu_mul_quantize, silu_mul_rotate_quantize
from atom_lab.qlinear import TRITON_CONFIGS, QuantLinear, SharedInput, check_backend

# Module classes whose forward is exactly Llama's RMSNorm / gated MLP, so the fused kernels may replace them.
FUSABLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
FUSABLE_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")
SILU_ACTS = ("silu", "swish")
# (norm attribute of a block, the linears reading its output)
NORM_CONSUMERS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                  ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))


def _placeholder(x: torch.Tensor) -> torch.Tensor:
    # One NaN broadcast to x's shape (no memory per element): the shape the attention / MLP code reads, nothing else.
    return torch.full((), float("nan"), dtype=x.dtype, device=x.device).expand(x.shape)


class RMSNormQuantize(torch.nn.Module):
    """Replaces a block's RMSNorm on the Triton backend: fused RMSNorm + reorder + quantize (rmsnorm_quantize).

    Holds the original norm's weight Parameter (same state_dict key) and its eps; the reorder index, group size,
    keeper count and activation clip come from the consumers (q/k/v or gate/up share them by construction).
    forward(x: float [..., H]) puts the PackedAtom of RMSNorm(x) (M = x.numel() // H rows) into `shared` and
    returns a NaN placeholder of x's shape, which the consumers recognise (module docstring).
    """

    def __init__(self, norm: torch.nn.Module, consumers: list[QuantLinear], shared: SharedInput):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = float(norm.variance_epsilon)
        self.shared = shared
        self._consumers = tuple(consumers)  # a tuple: not registered here, they live in the attention / MLP module
        self._original = (norm,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self._consumers[0]
        packed = rmsnorm_quantize(x, self.weight, self.variance_epsilon, c.kernel_index, c.group_size, c.keeper,
                                  c.a_clip)
        out = _placeholder(x)
        self.shared.put(out, packed)
        return out

    def extra_repr(self) -> str:
        names = ", ".join(m.name.rsplit(".", 1)[-1] for m in self._consumers)
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, feeds one PackedAtom to {names}"


class FusedMLP(torch.nn.Module):
    """Replaces a block's gated MLP on the Triton backend: down_proj(SiLU(gate_proj(x)) * up_proj(x)) with the
    SiLU, the product and down_proj's reorder + quantize in one kernel (silu_mul_quantize).

    gate_proj, up_proj, down_proj are the original QuantLinears (same state_dict keys). forward(x: [..., H]) ->
    [..., H] in x's dtype; x is usually the placeholder of a fused RMSNorm (gate/up take its PackedAtom).
    """

    def __init__(self, mlp: torch.nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self._original = (mlp,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        d = self.down_proj
        rotation = getattr(d, "atom_online_rotation", None)  # a rotated model (atom_lab.rotation): QuaRot's
        if rotation is not None:                              # online Hadamard, fused into the same kernel
            a = silu_mul_rotate_quantize(gate, up, rotation, d.kernel_index, d.group_size, d.keeper, d.a_clip)
        else:
            a = silu_mul_quantize(gate, up, d.kernel_index, d.group_size, d.keeper, d.a_clip)
        return d.forward_packed(a, gate.shape[:-1], x.dtype)


def _blocks(model) -> torch.nn.ModuleList:
    name = getattr(model, "atom_blocks_name", None)
    if name is None:
        raise ValueError("model was not quantized by atom_lab.quantize_model (no model.atom_blocks_name); "
                         "quantize it first, or load it with atom_lab.load_quantized.")
    return model.get_submodule(name)


def _shared(a: QuantLinear, b: QuantLinear) -> bool:
    """True when two layers quantize their input identically (same index, group, keeper, clip)."""
    same_index = (a.reorder is None and b.reorder is None) or (
        a.reorder is not None and b.reorder is not None and torch.equal(a.reorder, b.reorder))
    return same_index and (a.group_size, a.keeper, a.a_clip) == (b.group_size, b.keeper, b.a_clip)


def _unfuse(block: torch.nn.Module) -> None:
    for norm_name, _ in NORM_CONSUMERS:
        m = getattr(block, norm_name, None)
        if isinstance(m, RMSNormQuantize):
            setattr(block, norm_name, m._original[0])
    if isinstance(getattr(block, "mlp", None), FusedMLP):
        block.mlp = block.mlp._original[0]
    for m in block.modules():
        if isinstance(m, QuantLinear):
            m.shared_input = None


def _fuse(block: torch.nn.Module, hidden_act: str | None) -> list[str]:
    """Fuse what this block allows; returns what was fused, for model.atom_fusions."""
    done = []
    for norm_name, names in NORM_CONSUMERS:
        try:
            layers = [block.get_submodule(n) for n in names]
        except AttributeError:
            continue
        if not all(isinstance(m, QuantLinear) and m.backend == "triton" for m in layers):
            continue
        if not all(_shared(layers[0], m) for m in layers[1:]):
            continue
        shared = SharedInput()
        for m in layers:  # quantized once even when the norm is not fusable: the first layer shares its PackedAtom
            m.shared_input = shared
        norm = getattr(block, norm_name, None)
        if type(norm).__name__ in FUSABLE_NORMS:
            setattr(block, norm_name, RMSNormQuantize(norm, layers, shared))
            done.append(norm_name)
    mlp = getattr(block, "mlp", None)
    if (type(mlp).__name__ in FUSABLE_MLPS and hidden_act in SILU_ACTS
            and all(isinstance(getattr(mlp, n, None), QuantLinear) and getattr(mlp, n).backend == "triton"
                    for n in ("gate_proj", "up_proj", "down_proj"))):
        block.mlp = FusedMLP(mlp)
        done.append("mlp")
    return done


def set_backend(model, backend: str):
    """Switch every QuantLinear of a quantized model to `backend`, in place; returns the model.

    "reference": the float simulation (QuantLinear.forward with fake quantization), the model's original modules.
    "triton":    the kernels; every quantized layer must be packed (TRITON_CONFIGS), and llama / mistral / qwen2
                 blocks get the fused RMSNorm + quantize and SiLU * up + quantize modules (module docstring).
    No weight is re-quantized: both backends read the same buffers. model.atom_backend records the choice and
    model.atom_fusions what was fused per block.
    """
    check_backend(backend)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise ValueError("model holds no QuantLinear layers: quantize it first with atom_lab.quantize_model.")
    if backend == "triton":
        bad = [m.name for m in layers if not m.is_packed]
        if bad:
            raise ValueError(f"backend='triton' cannot run {len(bad)} layer(s) (e.g. {bad[0]}, config "
                             f"{layers[0].config.name!r}): {TRITON_CONFIGS}.")
    blocks = _blocks(model)
    for block in blocks:
        _unfuse(block)
    for m in layers:
        m.set_backend(backend)
    fusions = {}
    if backend == "triton":
        hidden_act = getattr(model.config, "hidden_act", None)
        for i, block in enumerate(blocks):
            fusions[i] = _fuse(block, hidden_act)
    model.atom_backend = backend
    model.atom_fusions = fusions
    return model
