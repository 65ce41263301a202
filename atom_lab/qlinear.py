"""QuantLinear: one quantized linear layer (reorder index + quantized weight + run-time activation quantizer).

Atom-style W4A4 layers store their weight in the packed Atom format (atom_lab.kernels.PackedAtom: INT4 groups
packed two per byte plus INT8 keeper columns), the format the Triton kernels read. The "reference" backend
simulates the kernel in float: it gathers x by the reorder index, fake-quantizes the activation exactly as the
packed format would (dequantize_atom_ref(quantize_atom_ref(x))), and multiplies by the dequantized weight.
Other configurations (w8a8, w4a16, w4a4 per channel) keep integer levels and scales, and a float copy for the
reference matmul. nbytes() counts what is stored, honestly (see size_report()).

The "triton" backend runs packed layers for real: forward quantizes the activation with the reorder + quantize
kernel (atom_lab.kernels.reorder_quantize) into a PackedAtom and multiplies it with the stored PackedAtom weight
in the W4A4 GEMM kernel (atom_lab.kernels.w4a4_gemm), then adds the bias. Both backends hold the SAME buffers, so
a layer (or a whole model, atom_lab.set_backend) can switch between them without re-quantizing. Layers reading one
activation (q/k/v, gate/up) can share a SharedInput so that activation is quantized once; atom_lab/backend.py also
fuses the preceding RMSNorm or SiLU(gate) * up into that quantization.

Construction (from_linear / from_linears) checks its arguments and stores buffers; the calibration itself (reorder
index, clip search, GPTQ or RTN levels) lives in atom_lab/calibrate.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from atom_lab.calibrate import calibrate_linear, stack_linears
from atom_lab.config import AtomConfig
from atom_lab.gptq import column_groups
from atom_lab.kernels import PackedAtom, dequantize_atom_ref, reorder_quantize, w4a4_gemm
from atom_lab.quantizers import fake_quantize_asymmetric, fake_quantize_mixed

BACKENDS = ("reference", "triton")
TRITON_CONFIGS = ("the Triton backend runs packed Atom-style W4A4 layers: preset 'atom', or an AtomConfig with "
                  "w_bits=a_bits=4, symmetric weights and activations, keeper_bits=8 and group_size 32/64/128 "
                  "(the ablation rows '+ group' to '+ INT4 KV'); presets fp16, w8a8, w4a16 and w4a4-rtn are not "
                  "packed and run on backend='reference'")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not available; supported backends: {', '.join(BACKENDS)} "
                         "('reference' simulates the packed kernels in float, 'triton' runs them).")


class SharedInput:
    """A one-entry cache handing one quantized activation to every QuantLinear that reads it (q/k/v, gate/up).

    The producer (the first consumer, or a fused RMSNorm, atom_lab/backend.py) puts (x, PackedAtom); a consumer
    whose input `is` that very tensor object, unmodified since, takes the PackedAtom instead of quantizing again.
    Any other input misses and is quantized by the consumer itself, so a stale entry can never be used.
    """

    def __init__(self):
        self.key, self.version, self.packed = None, None, None

    def put(self, x: torch.Tensor, packed: PackedAtom) -> None:
        self.key, self.version, self.packed = x, x._version, packed

    def get(self, x: torch.Tensor) -> PackedAtom | None:
        if x is self.key and x._version == self.version:
            return self.packed
        return None


class QuantLinear(torch.nn.Module):
    """A quantized replacement for nn.Linear(in_features=K, out_features=N). Build it with from_linear().

    Buffers (all on the layer's device):
        reorder:   int64 [K] or None. Input channel reorder[i] goes to position i (outliers last).
        packed_*:  the PackedAtom tensors (q4 uint8 [N, (K-keeper)/2], s4 fp16 [N, (K-keeper)/G], q8 int8
                   [N, keeper], s8 fp16 [N, 1]) for Atom-style layers; else
        w_q, w_scale, w_zero: integer levels (int8 [N, K]; uint8 for asymmetric), fp16 scales and uint8 zero
                   points [N, n_groups] for quantized weights that are not in the packed format.
        w_ref:     float [N, K] the dequantized weight in reordered column order (the reference matmul's operand;
                   a cache derived from the buffers above, not counted by nbytes()).
        bias:      float [N] or None.
    """

    def __init__(self, in_features: int, out_features: int, config: AtomConfig, group_size: int | None,
                 a_clip: float, w_clip: float, out_bits: int = 16, out_group: int | None = None,
                 backend: str = "reference", name: str = ""):
        super().__init__()
        check_backend(backend)
        self.in_features, self.out_features = in_features, out_features
        self.config, self.group_size, self.backend, self.name = config, group_size, backend, name
        self.a_clip, self.w_clip = float(a_clip), float(w_clip)
        self.out_bits, self.out_group = out_bits, out_group
        self.keeper = config.keeper
        self.is_packed = False
        self.float_dtype = torch.float32  # dtype of the float layer this one replaces (w_ref's dtype)
        self.shared_input: SharedInput | None = None  # set by atom_lab.set_backend for q/k/v and gate/up
        self.register_buffer("reorder", None)
        self.register_buffer("bias", None)
        self.register_buffer("w_ref", None, persistent=False)

    # --- construction --------------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: torch.nn.Linear, config: AtomConfig, stats=None, backend: str = "reference",
                    reorder: torch.Tensor | None = None, hessian: torch.Tensor | None = None,
                    inputs: torch.Tensor | None = None, out_bits: int = 16, out_group: int | None = None,
                    name: str = "") -> QuantLinear:
        """Quantize one nn.Linear.

        Args:
            linear: nn.Linear with weight [N, K] (float) and optional bias [N].
            config: the AtomConfig.
            stats: atom_lab.ChannelStats of this layer's input (from collect_stats); used for the reorder index
                when `reorder` is not given, and its `samples` [T, K] as calibration inputs when `inputs` and
                `hessian` are not given.
            backend: "reference" (float simulation) or "triton" (packed layers only: the kernels run forward; the
                buffers are the same either way, see set_backend).
            reorder: int64 [K] reorder index (from reorder_index; shared by layers reading the same activation).
            hessian: float [K, K] = X^T X of calibration inputs in the ORIGINAL channel order (GPTQ).
            inputs: float [T, K] calibration inputs in the original order (clip search; GPTQ Hessian if no hessian).
            out_bits, out_group: fake-quantize the layer's OUTPUT asymmetrically, per token in groups of out_group
                (the KV cache: k_proj/v_proj with out_group = head_dim); 16 = off.
            name: the module name, for error messages and reports.
        """
        check_backend(backend)
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}.")
        if not isinstance(config, AtomConfig):
            raise TypeError(f"config must be an atom_lab.AtomConfig (e.g. AtomConfig.preset('atom')), "
                            f"got {type(config).__name__}.")
        N, K = linear.weight.shape
        where = name or f"a linear layer [{N}, {K}]"
        config.layer_group_size(K, where)  # a group size that does not divide K fails here, before the checks below
        if backend == "triton" and not config.packed(K):
            raise ValueError(f"backend='triton' cannot run {where} with config {config.name!r}: {TRITON_CONFIGS}.")
        if out_bits < 16 and (out_group is None or N % out_group):
            raise ValueError(f"out_group={out_group} must divide out_features={N} of {where} (use head_dim).")
        cal = calibrate_linear(linear, config, where, stats, reorder, hessian, inputs)

        self = cls(K, N, config, cal.group_size, cal.a_clip, cal.w_clip, out_bits, out_group, "reference", name)
        self.float_dtype = linear.weight.dtype
        self.reorder = cal.reorder
        if linear.bias is not None:
            self.bias = linear.bias.detach().clone()
        if cal.levels is None:
            self.w_ref = cal.weight.to(linear.weight.dtype)
            self.register_buffer("w_float", self.w_ref)
            return self.set_backend(backend)
        res = cal.levels
        if config.packed(K):
            p = res.to_packed_atom()
            self.is_packed = True
            for f in ("q4", "s4", "q8", "s8"):
                self.register_buffer(f"packed_{f}", getattr(p, f))
            self.w_ref = dequantize_atom_ref(p).to(linear.weight.dtype)
        else:
            signed = all(g.symmetric for g in res.groups)
            self.register_buffer("w_q", res.q.to(torch.int8 if signed else torch.uint8))
            self.register_buffer("w_scale", res.scale)
            self.register_buffer("w_zero", None if signed else res.zero)
            self.w_ref = res.weight.to(linear.weight.dtype)
        return self.set_backend(backend)

    @classmethod
    @torch.no_grad()
    def from_linears(cls, linears: list[torch.nn.Linear], config: AtomConfig, names: list[str] | None = None,
                     out_bits: list[int] | None = None, out_group: int | None = None, **kwargs) -> list[QuantLinear]:
        """Quantize several linears that read the SAME activation (q/k/v, or gate/up) together.

        They share the reorder index and the activation clip ratio (the real kernel quantizes that activation
        once, fused into the norm), and their weight rows are quantized as one stacked matrix: GPTQ and RTN treat
        rows independently, so the levels are the same as quantizing each alone, with one GPTQ pass instead of
        several. kwargs go to from_linear (stats, backend, reorder, hessian, inputs).
        Returns: one QuantLinear per input linear, in order.
        """
        backend = kwargs.pop("backend", "reference")
        check_backend(backend)
        names = names or [""] * len(linears)
        out_bits = out_bits or [16] * len(linears)
        fused, label = stack_linears(linears, names)
        K = fused.in_features
        if backend == "triton" and not config.packed(K):
            raise ValueError(f"backend='triton' cannot run {label} with config {config.name!r}: {TRITON_CONFIGS}.")
        whole = cls.from_linear(fused, config, name=label, backend="reference", **kwargs)
        parts, r0 = [], 0
        for m, n, ob in zip(linears, names, out_bits):
            if ob < 16 and (out_group is None or m.out_features % out_group):
                raise ValueError(f"out_group={out_group} must divide out_features={m.out_features} of {n} "
                                 "(use head_dim).")
            parts.append(whole._rows(r0, r0 + m.out_features, m, n, ob, out_group).set_backend(backend))
            r0 += m.out_features
        return parts

    def _rows(self, r0: int, r1: int, linear: torch.nn.Linear, name: str, out_bits: int,
              out_group: int | None) -> QuantLinear:
        """A QuantLinear holding output rows [r0, r1) of this one, with linear's bias."""
        part = QuantLinear(self.in_features, r1 - r0, self.config, self.group_size, self.a_clip, self.w_clip,
                           out_bits, out_group, self.backend, name)
        part.is_packed = self.is_packed
        part.float_dtype = self.float_dtype
        part.reorder = self.reorder
        for b in ("packed_q4", "packed_s4", "packed_q8", "packed_s8", "w_q", "w_scale", "w_zero", "w_float"):
            if hasattr(self, b):
                t = getattr(self, b)
                part.register_buffer(b, None if t is None else t[r0:r1].clone())
        part.w_ref = part.w_float if hasattr(part, "w_float") else self.w_ref[r0:r1].clone()
        if linear.bias is not None:
            part.bias = linear.bias.detach().clone()
        return part

    @property
    def packed(self) -> PackedAtom | None:
        """The stored weight in the packed Atom format (None for layers not in that format)."""
        if not self.is_packed:
            return None
        return PackedAtom(self.packed_q4, self.packed_s4, self.packed_q8, self.packed_s8, self.group_size)

    def set_backend(self, backend: str) -> QuantLinear:
        """Run this layer on "reference" (float simulation) or "triton" (the kernels); returns self.

        Nothing is re-quantized: the stored buffers are the same. The triton backend drops the float w_ref cache
        (the kernels read the packed weight); switching back rebuilds it exactly, dequantize_atom_ref(packed).
        """
        check_backend(backend)
        if backend == "triton" and not self.is_packed:
            raise ValueError(f"backend='triton' cannot run {self.name or 'this layer'} "
                             f"(config {self.config.name!r}): {TRITON_CONFIGS}.")
        if backend == "triton":
            self.w_ref = None
        elif self.w_ref is None:
            self.w_ref = self.dequantized_weight()
        self.backend = backend
        return self

    def dequantized_weight(self) -> torch.Tensor:
        """float [N, K] (float_dtype), reordered column order: the stored weight's values, rebuilt from the
        stored integer levels and scales (exactly what from_linear computed as the reference operand)."""
        if self.is_packed:
            return dequantize_atom_ref(self.packed).to(self.float_dtype)
        if hasattr(self, "w_float"):
            return self.w_float
        c = self.config
        groups = column_groups(self.in_features, c.w_bits, self.group_size, self.keeper, c.keeper_bits, 1.0,
                               c.w_symmetric)
        if any(g.bits >= 16 for g in groups):
            raise ValueError(f"{self.name or 'this layer'} keeps float keeper columns (keeper_bits=16), which are "
                             "not stored in w_q; its weight cannot be rebuilt from the quantized buffers.")
        W = torch.empty(self.out_features, self.in_features, dtype=torch.float32, device=self.w_q.device)
        for i, g in enumerate(groups):  # the same float32 products as rtn_quantize / gptq_quantize
            q, s = self.w_q[:, g.start:g.end].float(), self.w_scale[:, i:i + 1].float()
            W[:, g.start:g.end] = q * s if self.w_zero is None else (q - self.w_zero[:, i:i + 1].float()) * s
        return W.to(self.float_dtype)

    @property
    def kernel_index(self) -> torch.Tensor:
        """int64 [K]: the reorder index the quantize kernels gather with (the identity when not reordering)."""
        if self.reorder is not None:
            return self.reorder
        ident = getattr(self, "_identity", None)
        if ident is None or ident.device != self.packed_q4.device:
            self.register_buffer("_identity", torch.arange(self.in_features, device=self.packed_q4.device),
                                 persistent=False)
        return self._identity

    # --- run time ------------------------------------------------------------------------------------------------
    def quantize_input(self, x: torch.Tensor) -> PackedAtom:
        """Triton backend: the PackedAtom of x [..., K] (original channel order), M = x.numel() // K rows.

        Taken from shared_input when the activation was already quantized (by a fused RMSNorm, or by another layer
        reading the same tensor), else quantized here by reorder_quantize (gather + INT4/INT8 quantize + pack).
        """
        if self.shared_input is not None:
            a = self.shared_input.get(x)
            if a is not None:
                return a
        a = reorder_quantize(x, self.kernel_index, self.group_size, self.keeper, self.a_clip)
        if self.shared_input is not None:
            self.shared_input.put(x, a)
        return a

    def forward_packed(self, a: PackedAtom, lead_shape, dtype: torch.dtype) -> torch.Tensor:
        """Triton backend: y = a @ W^T (+ bias) by the W4A4 GEMM kernel, from a packed activation of M rows.

        Args:
            a: PackedAtom of M = prod(lead_shape) token rows, quantized with this layer's index, group and keeper.
            lead_shape: the leading dimensions of the output; dtype: its dtype (float16/bfloat16/float32).
        Returns:
            [*lead_shape, N] of dtype (with the KV-cache fake quantization for k_proj/v_proj when out_bits < 16).
        """
        y = w4a4_gemm(a, self.packed, out_dtype=dtype)
        if self.bias is not None:
            y = y + self.bias.to(dtype)  # a [N] vector, not the [M, N] residual the GEMM epilogue can add
        return self._quantize_output(y.view(*lead_shape, self.out_features))

    def _quantize_output(self, y: torch.Tensor) -> torch.Tensor:
        if self.out_bits < 16:
            # KV cache: asymmetric, per token per head, fake-quantized in float on BOTH backends: the float
            # simulation. K is quantized BEFORE RoPE (RoPE is applied later inside the attention module), which is
            # what Atom does (its decode kernel rotates K after dequantizing). The real packed cache is
            # atom_lab/kv_cache.py (PagedDecoder switches this simulation off while it stores the codes).
            y = fake_quantize_asymmetric(y, self.out_bits, self.out_group)
        return y

    def quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize a reordered activation x [..., K] as the real path would, per token; same dtype."""
        c = self.config
        if c.a_bits >= 16:
            return x
        # For packed layers this is exactly dequantize_atom_ref(quantize_atom_ref(x, G, keeper, a_clip)) (tests
        # check it bit for bit), computed without packing nibbles, which the float simulation does not need.
        return fake_quantize_mixed(x, c.a_bits, self.group_size, self.keeper, c.keeper_bits, self.a_clip,
                                   c.a_symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [..., K] in the ORIGINAL channel order -> [..., N]."""
        if x.shape[-1] != self.in_features:  # noqa: SIM102
            raise ValueError(f"{self.name or 'QuantLinear'}: input has {x.shape[-1]} channels, "
                             f"expected in_features={self.in_features}.")
        if self.backend == "triton":
            return self.forward_packed(self.quantize_input(x), x.shape[:-1], x.dtype)
        if self.reorder is not None:
            x = x.index_select(-1, self.reorder)  # the real kernels fuse this gather into the norm / SiLU*up
        x = self.quantize_activation(x)
        y = F.linear(x, self.w_ref.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return self._quantize_output(y)

    # --- size ----------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of what this layer stores for its weight: packed or integer levels, scales, zeros, bias, and the
        reorder index (int64 here; a kernel would use int16). The float w_ref cache of the reference backend is
        excluded (see size_report)."""
        names = (["packed_q4", "packed_s4", "packed_q8", "packed_s8"] if self.is_packed else
                 ["w_float"] if self.config.w_bits >= 16 else ["w_q", "w_scale", "w_zero"])
        tensors = [getattr(self, n, None) for n in names] + [self.bias, self.reorder]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def size_report(self) -> dict:
        """Stored bytes next to the float layer's (float16 and float32 weight), and the ideal bytes if the integer
        levels were bit-packed; reference_cache_bytes is the float w_ref the reference backend keeps (0 on triton)."""
        N, K, c = self.out_features, self.in_features, self.config
        if self.is_packed:
            fmt = f"packed Atom: INT4 groups of {self.group_size} + {self.keeper} INT8 keeper columns"
        elif c.w_bits >= 16:
            fmt = "float weight (not quantized)"
        else:
            fmt = (f"int{c.w_bits} levels stored one per byte (reference backend), "
                   f"{'per channel' if self.group_size is None else f'groups of {self.group_size}'}")
        scales = 0 if c.w_bits >= 16 else (self.w_scale.numel() * 2 * (1 if c.w_symmetric else 1.5)
                                           if not self.is_packed else 0)
        ideal_bits = (K - self.keeper) * c.w_bits + self.keeper * c.keeper_bits if c.w_bits < 16 else K * 16
        return {"name": self.name, "shape": [N, K], "format": fmt, "backend": self.backend,
                "stored_bytes": self.nbytes(), "fp16_bytes": N * K * 2, "float32_bytes": N * K * 4,
                "ideal_bytes": int(N * ideal_bits / 8 + scales) if not self.is_packed else self.nbytes(),
                "reference_cache_bytes": 0 if self.w_ref is None else self.w_ref.numel() * self.w_ref.element_size()}

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, w{c.w_bits}a{c.a_bits}, "
                f"group={self.group_size}, keeper={self.keeper}, a_clip={self.a_clip:g}, w_clip={self.w_clip:g}, "
                f"packed={self.is_packed}, kv_bits={self.out_bits}, backend={self.backend}")
