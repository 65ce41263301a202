"""Machine-independent agreement checks: the Triton backend against the reference backend.

Two float32 paths that feed a quantizer (Hugging Face's RMSNorm vs the kernel's, F.linear vs the W4A4 GEMM) differ by
a few roundings, and which roundings depends on the CPU (ATen/MKL kernel choice, threads). A code then flips by one
step exactly where the two float values lie on opposite sides of a rounding boundary. So nothing here compares two
quantized paths with a tolerance; instead:

1. assert_codes_explained(got, v_got, v_ref): the codes and scales the kernels produced (`got`) against the
   reference quantizer applied to the reference's own float values v_ref. Every scale or code that differs must be
   one step apart AND lie at a rounding boundary crossed between v_ref and v_got (the float values the kernel
   quantized, recomputed by the kernel's *_ref float function), widened by ETA for the kernel's own float64 ->
   float32 rounding (kernels/act_quant.py). Flips are counted; their number must stay below the Poisson bound of
   the boundary-crossing probabilities (see flip_bound). v_got = v_ref is the per-quantizer check: kernel vs *_ref
   on the same input.
2. check_block: one decoder block, teacher-forced. Both backends get the same block input; the reference block's
   QuantLinears take the Triton side's dequantized codes (and KV-cache outputs) instead of quantizing themselves, so
   no quantizer boundary is crossed any more and the block outputs must agree within a float32 summation bound
   (gemm_tolerance, propagated through the two residual adds). The reference's own codes are checked as in 1.
"""
from __future__ import annotations

import contextlib
import math

import torch

from atom_lab import QuantLinear
from atom_lab import backend as B
from atom_lab import qlinear as QL
from atom_lab.kernels import (PackedAtom, dequantize_atom_ref, quantize_atom_ref, rmsnorm_ref, silu_mul_ref,
                              unpack_int4_ref, w4a4_gemm_ref)

U = 2.0 ** -24  # float32 unit roundoff
# Kernel-internal slack, in units of |value|: the kernels round a float64 rstd / SiLU once to float32 (<= U relative),
# then do the same float32 products as the reference; 4 U covers that rounding and the division by the scale.
ETA = 4 * U


def codes(p: PackedAtom) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 codes [R, K] and float32 per-value scales [R, K] of a PackedAtom (INT4 groups, then INT8 keepers)."""
    q = torch.cat([unpack_int4_ref(p.q4).int(), p.q8.int()], 1)
    s = torch.cat([p.s4.float().repeat_interleave(p.group_size, 1), p.s8.float().expand(-1, p.keeper)], 1)
    return q, s


def _qmax(K: int, keeper: int, device) -> torch.Tensor:
    qm = torch.full((K,), 7.0, device=device)
    qm[K - keeper:] = 127.0
    return qm


def flip_bound(expected: float) -> float:
    """Most code flips allowed when `expected` = E is the sum of the per-value crossing probabilities.

    A code flips iff a rounding boundary (spacing 1 in code units) lies between the two paths' values t_ref, t_got.
    The fractional parts of v / scale are spread evenly at INT4/INT8 resolution, so value i flips with probability
    p_i = min(1, |t_got - t_ref| + widening), independently: the count N is Poisson-binomial with mean E, and by the
    Chernoff bound P(N >= k) <= exp(-E) (e E / k)^k, P(N > E + 6 sqrt(E) + 6) is below ~1.5e-8 for every E.
    Two float32 paths that differ by a few ulp make E ~ 1e-6 per value, so a kernel flipping codes of its own
    (E unchanged, N up) is caught, and the bound depends on no machine: E is measured from the two float paths.
    """
    return expected + 6 * math.sqrt(expected) + 6


@torch.no_grad()
def assert_codes_explained(got: PackedAtom, v_got: torch.Tensor, v_ref: torch.Tensor, clip: float,
                           what: str = "") -> dict:
    """Codes/scales `got` vs quantize_atom_ref(v_ref): every difference is a one-step crossing between v_ref and v_got.

    got: PackedAtom of R rows (K channels, reordered); v_got, v_ref: float [R, K], reordered, the float values the
    kernel and the reference quantized. Returns counts {"values", "flips", "scale_flips", "expected"}.
    """
    v_got, v_ref = v_got.float().reshape(got.rows, -1), v_ref.float().reshape(got.rows, -1)
    R, K = v_ref.shape
    G, keeper = got.group_size, got.keeper
    ref = quantize_atom_ref(v_ref, G, keeper, clip)
    q_got, s_got = codes(got)
    q_ref, s_ref = codes(ref)
    qmax = _qmax(K, keeper, v_ref.device)
    clip_v = torch.where(qmax > 100, 1.0, clip)

    # Scales: fp16(clip * amax / qmax). A differing scale needs an fp16 rounding boundary between the two paths' values.
    def pre_scale(v):
        m4 = v[:, :K - keeper].abs().reshape(R, -1, G).amax(-1).repeat_interleave(G, 1)
        m8 = v[:, K - keeper:].abs().amax(-1, keepdim=True).expand(-1, keeper)
        return torch.cat([m4, m8], 1) * clip_v / qmax
    c_got, c_ref = pre_scale(v_got), pre_scale(v_ref)
    lo = (torch.minimum(c_got, c_ref) * (1 - ETA)).half().float()
    hi = (torch.maximum(c_got, c_ref) * (1 + ETA)).half().float()
    s_diff = s_got != s_ref
    ok = (s_got >= lo) & (s_got <= hi) | ~s_diff
    assert ok.all(), f"{what}: {int((~ok).sum())} scales differ from the reference's without a rounding crossing"

    # Codes: round(v / s), clamped; got's code must lie in the rounding of [t_ref, t_got] widened by ETA.
    t_got, t_ref = v_got / s_got, v_ref / s_ref
    widen = ETA * torch.maximum(t_got.abs(), t_ref.abs()) + ETA
    t_lo, t_hi = torch.minimum(t_got, t_ref) - widen, torch.maximum(t_got, t_ref) + widen
    q_lo = torch.clamp(torch.round(t_lo), -qmax - 1, qmax)
    q_hi = torch.clamp(torch.round(t_hi), -qmax - 1, qmax)
    step = (q_got - q_ref).abs()
    assert step.max() <= 1, f"{what}: a code differs from the reference's by {int(step.max())} steps"
    bad = (q_got < q_lo) | (q_got > q_hi)
    assert not bad.any(), (f"{what}: {int(bad.sum())} codes differ from the reference's where no rounding boundary "
                           f"lies between the two float values (first at {bad.nonzero()[0].tolist()})")
    # Expected crossings: a boundary (spacing 1 in code units) falls in an interval of width w with probability ~w.
    expected = float((t_hi - t_lo).clamp(max=1).sum()) + float(s_diff.sum())
    n_flips, n_scale = int((step > 0).sum()), int(s_diff.sum())
    assert n_flips <= flip_bound(expected), (what, n_flips, expected)
    return {"values": R * K, "flips": n_flips, "scale_flips": n_scale, "expected": expected}


def gemm_tolerance(abs_sum: torch.Tensor, K: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise bound on |y1 - y2| for two float32 evaluations of one dot product of length K (any order, any
    blocking): each is within (K + 1) U * sum|a||w| of the exact value (Higham, products + sums), plus the bias add
    and the output rounding; abs_sum = w4a4_gemm_ref(a, w, absolute=True), float32 [M, N]."""
    tol = (2 * K + 4) * U * abs_sum
    return tol if bias is None else tol + 2 * U * bias.float().abs()


@contextlib.contextmanager
def _patched(obj, name, fn):
    old = obj.__dict__.get(name, None)
    setattr(obj, name, fn)
    try:
        yield
    finally:
        if old is None and isinstance(obj, torch.nn.Module):
            delattr(obj, name)
        else:
            setattr(obj, name, old)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _out(y):
    return y[0] if isinstance(y, tuple) else y


@torch.no_grad()
def check_block(ref_block: torch.nn.Module, tri_block: torch.nn.Module, x: torch.Tensor, kwargs: dict) -> dict:
    """Teacher-forced agreement of one decoder block: reference backend `ref_block` vs Triton backend `tri_block`.

    x: float32 [B, T, H] the block input; kwargs: the block's other arguments (position embeddings, mask). Asserts
    (a) every activation code a Triton QuantLinear consumed is the kernel's quantization of its own float input
    (kernel vs *_ref on the same input) and differs from the reference's own code only by a counted one-step
    boundary crossing (assert_codes_explained); every GEMM output equals w4a4_gemm_ref within gemm_tolerance;
    (b) with the Triton codes injected into the reference block, the block outputs agree within the o_proj and
    down_proj summation bounds propagated through the residual adds (the only float paths left that do not end in
    a quantizer). Returns the summed counts of assert_codes_explained.
    """
    values = {}  # id(PackedAtom) -> (PackedAtom, float32 [R, K] reordered values the kernel quantized)

    def recording(fn, floats):
        def wrapper(*args, **kw):
            p = fn(*args, **kw)
            values[id(p)] = (p, floats(*args))
            return p
        return wrapper

    def gather(v, index):
        return _flat(v)[:, index.long()]
    rms = recording(B.rmsnorm_quantize, lambda x, w, eps, index, *a: gather(rmsnorm_ref(_flat(x), w, eps), index))
    silu = recording(B.silu_mul_quantize, lambda g, u, index, *a: gather(silu_mul_ref(_flat(g), _flat(u)), index))
    plain = recording(QL.reorder_quantize, lambda x, index, *a: gather(x.float(), index))

    tri_layers = {n: m for n, m in tri_block.named_modules() if isinstance(m, QuantLinear)}
    ref_layers = {n: m for n, m in ref_block.named_modules() if isinstance(m, QuantLinear)}
    assert tri_layers.keys() == ref_layers.keys() and tri_layers
    consumed, outputs = {}, {}  # name -> PackedAtom; name -> (GEMM + bias output, after the KV fake quantization)
    seen_ref, own_kv = {}, {}

    def tri_hooks(name, m):
        real_fp, real_qo = m.forward_packed, m._quantize_output

        def forward_packed(a, lead_shape, dtype):
            consumed[name] = a
            return real_fp(a, lead_shape, dtype)

        def quantize_output(y):
            out = real_qo(y)
            outputs[name] = (y, out)
            return out
        return [_patched(m, "forward_packed", forward_packed), _patched(m, "_quantize_output", quantize_output)]

    def ref_hooks(name, m):
        real_qo = m._quantize_output

        def quantize_activation(xr):  # xr: the reordered activation the reference would quantize itself
            seen_ref[name] = xr
            return dequantize_atom_ref(consumed[name]).to(xr.dtype).reshape(xr.shape)

        def quantize_output(y):
            own_kv[name] = (y, real_qo(y))
            return outputs[name][1]
        return [_patched(m, "quantize_activation", quantize_activation), _patched(m, "_quantize_output", quantize_output)]

    with contextlib.ExitStack() as stack:
        for obj, name, fn in ((B, "rmsnorm_quantize", rms), (B, "silu_mul_quantize", silu),
                              (QL, "reorder_quantize", plain)):
            stack.enter_context(_patched(obj, name, fn))
        for n, m in tri_layers.items():
            for c in tri_hooks(n, m):
                stack.enter_context(c)
        y_tri = _out(tri_block(x, **kwargs))
    with contextlib.ExitStack() as stack:
        for n, m in ref_layers.items():
            for c in ref_hooks(n, m):
                stack.enter_context(c)
        y_ref = _out(ref_block(x, **kwargs))

    totals = {"values": 0, "flips": 0, "scale_flips": 0, "expected": 0.0, "kv_flips": 0}
    abs_sums = {}
    for n, m in tri_layers.items():
        a = consumed[n]
        p, v_got = values[id(a)]
        assert p is a, n
        assert_codes_explained(a, v_got, v_got, m.a_clip, f"{n} (kernel vs *_ref, same input)")
        counts = assert_codes_explained(a, v_got, seen_ref[n], m.a_clip, f"{n} (vs the reference's own codes)")
        for k in counts:
            totals[k] += counts[k]
        # the GEMM: kernel vs w4a4_gemm_ref on the same packed operands
        y, y_kv = outputs[n]
        bias = None if m.bias is None else m.bias.float()
        want = w4a4_gemm_ref(a, m.packed, torch.float32) + (0 if bias is None else bias)
        abs_sums[n] = w4a4_gemm_ref(a, m.packed, torch.float32, absolute=True)
        tol = gemm_tolerance(abs_sums[n], m.in_features, bias)
        assert ((_flat(y).float() - want).abs() <= tol).all(), f"{n}: GEMM outside the fp32 summation bound"
        if m.out_bits < 16:  # KV cache: asymmetric fake quantization in float on both sides, one step at most apart
            y_own, kv_own = own_kv[n]
            assert ((_flat(y_own).float() - _flat(y).float()).abs() <= tol).all(), f"{n}: pre-KV output"
            g = _flat(y).float().reshape(-1, m.out_group)
            kv_step = ((g.amax(-1) - g.amin(-1)) / (2 ** m.out_bits - 1)).repeat_interleave(m.out_group)
            d = (_flat(kv_own).float() - _flat(y_kv).float()).reshape(-1).abs()
            assert (d <= 1.01 * kv_step + 2 * tol.reshape(-1)).all(), f"{n}: KV codes more than one step apart"
            totals["kv_flips"] += int((d > 2 * tol.reshape(-1)).sum())

    # (b) injected codes: only the o_proj and down_proj sums (and the two residual adds) differ.
    o = next(n for n in tri_layers if n.endswith("o_proj"))
    dn = next(n for n in tri_layers if n.endswith("down_proj"))
    tol = (gemm_tolerance(abs_sums[o], tri_layers[o].in_features, tri_layers[o].bias)
           + gemm_tolerance(abs_sums[dn], tri_layers[dn].in_features, tri_layers[dn].bias)
           + 4 * U * (_flat(x).float().abs() + abs_sums[o] + abs_sums[dn]))
    diff = (_flat(y_tri).float() - _flat(y_ref).float()).abs()
    assert (diff <= tol).all(), f"block output outside the float32 bound: max excess {float((diff - tol).max())}"
    return totals


def flip_one(p: PackedAtom, what: str = "code") -> PackedAtom:
    """A copy of p with ONE INT8 keeper code moved by one step (what="code") or ONE INT4 group scale moved up by its
    relative 2^-10 (one or two fp16 ulps, what="scale"): the smallest corruptions a kernel could make."""
    q8, s4 = p.q8.clone(), p.s4.clone()
    if what == "code":
        q8[0, 0] += 1 if q8[0, 0] < 127 else -1
    else:
        s4[0, 0] = (s4[0, 0].float() * (1 + 2 ** -10)).half()
    return PackedAtom(p.q4, s4, q8, p.s8, p.group_size)
