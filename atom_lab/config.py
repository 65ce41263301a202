"""AtomConfig: every knob of Atom's quantizer, with validation, and the presets the course compares.

Atom (Zhao et al., MLSys 2024) quantizes every linear layer of the decoder blocks:
  weights      offline: reorder input columns (outliers last), INT4 groups + `keeper` INT8 columns, clip, GPTQ;
  activations  at run time, per token: the same reorder, INT4 groups + INT8 keeper channels, clip;
  KV cache     INT4, asymmetric, one scale and zero per token per head.
The presets are the baselines Atom compares with, plus Atom itself. SmolLM2-135M has hidden size 576, which 128
does not divide, so the "atom" preset uses groups of 64 (576 = 128 keeper + 7 x 64, MLP 1536 = 128 + 22 x 64);
on Llama-7B-like shapes AtomConfig.preset("atom", group_size=128) is the paper's exact recipe.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

BITS = (2, 3, 4, 5, 6, 7, 8, 16)
SORT_METRICS = ("hessian", "max")
ROTATIONS = ("hadamard", "random")  # atom_lab.rotation
KERNEL_GROUPS = (32, 64, 128)


def _clip_ok(c) -> bool:
    return c == "search" or (isinstance(c, (int, float)) and not isinstance(c, bool) and 0.0 < c <= 1.0)


@dataclass(frozen=True)
class AtomConfig:
    """How to quantize a decoder. 16 bits means "left in float" for weights, activations, keeper and KV cache.

    w_bits, a_bits:   weight and activation bits of the normal (non-keeper) channels.
    group_size:       channels per scale along the input dimension, for weights and activations alike;
                      None = one scale per output channel (weights) and per token (activations).
    keeper:           number of outlier input channels (sorted last) kept at keeper_bits; needs sort_metric.
    keeper_bits:      8 (Atom) or 16 (float16 outliers, as in LLM.int8()).
    w_clip, a_clip:   clip ratio in (0, 1] on each group's max|x|, or "search": per layer, the ratio on a grid that
                      minimises the layer's output MSE on calibration inputs.
    w_symmetric:      symmetric weights (Atom, required by the packed format) or asymmetric with zero points.
    a_symmetric:      symmetric activations (Atom) or asymmetric.
    sort_metric:      "hessian" (mean x^2, Atom's default), "max" (max|x|), or None: no reordering.
    gptq:             quantize weights with GPTQ (sequential, layer by layer) instead of round-to-nearest.
    gptq_damp:        GPTQ damping, a fraction of the mean Hessian diagonal.
    gptq_block:       GPTQ lazy-update block (speed only).
    kv_bits:          KV cache bits (asymmetric, per token per head); 16 = off.
    kv_group_size:    channels per KV scale/zero; None = head_dim (Atom: one per token per head).
    kv_rope:          when K is quantized relative to RoPE: "pre" (Atom: quantize K BEFORE RoPE and rotate it on
                      read, in its decode kernel) or "post" (QuaRot/QServe, KIVI, vLLM: quantize the rotated K).
                      The paged cache (KVFormat.from_config) and simulate_kv honour both; the in-layer fake
                      quantization of k_proj's output (kv_bits < 16 in quantize_model) sits before RoPE, so
                      quantize_model refuses kv_rope="post" with kv_bits < 16 (use kv_bits=16 and the cache).
    smooth_alpha:     SmoothQuant migration strength (0.5 in the paper) or None: no smoothing.
    rotation:         QuaRot-style rotation of the residual stream before calibration (atom_lab.rotation):
                      "hadamard" (randomised Hadamard), "random" (random orthogonal) or None.
    rotation_seed:    seed of the rotation's random signs / matrix.
    rotate_down:      with a rotation, also rotate every down_proj input at run time (online Hadamard).
    group_fallback:   when group_size does not divide a layer's channels, use the largest of 128/64/32 that does
                      (else per channel) instead of raising. Off for Atom, whose packed format needs exact groups.
    name:             a label for tables.
    """
    w_bits: int = 4
    a_bits: int = 4
    group_size: int | None = 128
    keeper: int = 128
    keeper_bits: int = 8
    w_clip: float | str = 1.0
    a_clip: float | str = 1.0
    w_symmetric: bool = True
    a_symmetric: bool = True
    sort_metric: str | None = "hessian"
    gptq: bool = False
    gptq_damp: float = 0.01
    gptq_block: int = 128
    kv_bits: int = 16
    kv_group_size: int | None = None
    kv_rope: str = "pre"
    smooth_alpha: float | None = None
    group_fallback: bool = False
    rotation: str | None = None
    rotation_seed: int = 0
    rotate_down: bool = True
    name: str = "custom"

    def __post_init__(self):
        for f in ("w_bits", "a_bits", "keeper_bits", "kv_bits"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v not in BITS:
                raise ValueError(f"{f}={v!r} is not supported; use one of {BITS} (16 = not quantized).")
        if self.keeper_bits not in (8, 16):
            raise ValueError(f"keeper_bits={self.keeper_bits} is not supported; use 8 (Atom's INT8 outliers) or 16.")
        g = self.group_size
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1):
            raise ValueError(f"group_size={g!r} must be a positive int (32, 64 or 128 for the kernels) or None "
                             "(per channel / per token).")
        if not isinstance(self.keeper, int) or isinstance(self.keeper, bool) or self.keeper < 0:
            raise ValueError(f"keeper={self.keeper!r} must be an int >= 0 (outlier channels kept at keeper_bits).")
        if self.sort_metric not in (*SORT_METRICS, None):
            raise ValueError(f"sort_metric={self.sort_metric!r} is unknown; use 'hessian', 'max' or None.")
        if self.keeper and self.sort_metric is None:
            raise ValueError(f"keeper={self.keeper} needs reordering (the keeper channels are the LAST ones after "
                             "sorting by an outlier metric); set sort_metric='hessian' or keeper=0.")
        for f in ("w_clip", "a_clip"):
            if not _clip_ok(getattr(self, f)):
                raise ValueError(f"{f}={getattr(self, f)!r} must be a ratio in (0, 1] or 'search'.")
        if not (isinstance(self.gptq_damp, (int, float)) and 0.0 < self.gptq_damp < 1.0):
            raise ValueError(f"gptq_damp={self.gptq_damp!r} must lie in (0, 1); GPTQ's default is 0.01.")
        kg = self.kv_group_size
        if kg is not None and (not isinstance(kg, int) or isinstance(kg, bool) or kg < 1):
            raise ValueError(f"kv_group_size={kg!r} must be a positive int dividing head_dim, or None (= head_dim).")
        if self.kv_rope not in ("pre", "post"):
            raise ValueError(f"kv_rope={self.kv_rope!r}: use 'pre' (quantize K before RoPE, Atom) or 'post' "
                             "(after RoPE, QServe / KIVI / vLLM).")
        if not isinstance(self.gptq_block, int) or self.gptq_block < 1:
            raise ValueError(f"gptq_block={self.gptq_block!r} must be a positive int (128 is usual).")
        if self.gptq and self.w_bits == 16:
            raise ValueError("gptq=True needs quantized weights, but w_bits=16; set w_bits=4 (or 8) or gptq=False.")
        if self.smooth_alpha is not None and not (isinstance(self.smooth_alpha, (int, float))
                                                   and 0.0 <= self.smooth_alpha <= 1.0):
            raise ValueError(f"smooth_alpha={self.smooth_alpha!r} must lie in [0, 1] (SmoothQuant uses 0.5) or None.")
        if self.rotation not in (*ROTATIONS, None):
            raise ValueError(f"rotation={self.rotation!r} is unknown; use 'hadamard', 'random' or None.")
        if not isinstance(self.rotation_seed, int) or isinstance(self.rotation_seed, bool):
            raise ValueError(f"rotation_seed={self.rotation_seed!r} must be an int.")
        if self.rotation is not None and self.smooth_alpha is not None:
            raise ValueError("rotation and smooth_alpha are not combined here; set one of them to None.")
        if self.smooth_alpha is not None and self.sort_metric is not None:
            raise ValueError("smooth_alpha and sort_metric are two different outlier remedies and this library does "
                             "not combine them; set smooth_alpha=None (Atom) or sort_metric=None, keeper=0 "
                             "(SmoothQuant).")

    # --- per-layer decisions -------------------------------------------------------------------------------------
    @property
    def quantizes(self) -> bool:
        """False for a config that leaves every linear layer and the KV cache in float (the fp16 preset)."""
        return self.w_bits < 16 or self.a_bits < 16 or self.kv_bits < 16

    @property
    def reorders(self) -> bool:
        return self.sort_metric is not None

    def layer_group_size(self, in_features: int, where: str = "a linear layer") -> int | None:
        """The group size used for a layer with in_features input channels (None = per channel / per token).

        Raises a ValueError naming both numbers and a fix when group_size does not divide the in_features - keeper
        normal channels, unless group_fallback is set: then the largest of 128/64/32 (at most group_size) that
        divides is used, or per channel when none does.
        """
        K, keeper, G = in_features, self.keeper, self.group_size
        if keeper >= K:
            raise ValueError(f"keeper={keeper} leaves no normal channels in {where} with in_features={K}; "
                             f"use keeper < {K} (Atom: 128).")
        normal = K - keeper
        if G is None or normal % G == 0:
            return G
        if self.group_fallback:
            for g in (c for c in sorted(KERNEL_GROUPS, reverse=True) if c <= G):
                if normal % g == 0:
                    return g
            return None
        ok = [g for g in KERNEL_GROUPS if normal % g == 0]
        keepers = [k for k in range(0, min(K, 513), 32) if (K - k) % G == 0 and k > 0] if keeper else []
        fixes = []
        if ok:
            fixes.append(f"group_size={ok[-1]} ({normal} = {normal // ok[-1]} x {ok[-1]})")
        if keepers:
            k = min(keepers, key=lambda k: abs(k - keeper))
            fixes.append(f"keeper={k} ({K - k} = {(K - k) // G} x {G})")
        fixes.append("group_fallback=True")
        raise ValueError(f"group_size={G} does not divide the {normal} normal channels of {where} "
                         f"(in_features={K} - keeper={keeper}); use " + " or ".join(fixes) + ".")

    def packed(self, in_features: int) -> bool:
        """True when a layer with in_features inputs is stored in the packed Atom format (kernels/formats.py):
        symmetric W4A4 with INT8 keeper channels and kernel-sized groups."""
        if not (self.w_bits == 4 and self.a_bits == 4 and self.keeper_bits == 8 and self.w_symmetric
                and self.a_symmetric):
            return False
        G = self.layer_group_size(in_features)
        return G in KERNEL_GROUPS and (in_features - self.keeper) % 64 == 0

    def replace(self, **changes) -> AtomConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    # --- presets ---------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, /, **overrides) -> AtomConfig:
        """A named configuration, optionally with fields overridden: AtomConfig.preset("atom", group_size=128).

        fp16      no quantization (the float model as loaded).
        w8a8      SmoothQuant: smoothing alpha 0.5 folded into the preceding norm / linear, INT8 per-channel
                  weights, INT8 per-token activations, round-to-nearest.
        w4a16     GPTQ weights only: INT4 asymmetric groups of 128 (64 where 128 does not divide a layer's input
                  channels, as for SmolLM2's 576; see group_fallback), activations in float.
        w4a4-rtn  INT4 per-channel weights, INT4 per-token activations, round-to-nearest, no reordering.
        atom      Atom: INT4 groups of 64 (128 in the paper; SmolLM2's 576 - 128 = 448 channels allow 64),
                  128 INT8 keeper channels sorted by the Hessian diagonal, clip 0.85 weights / 0.9 activations,
                  GPTQ, INT4 KV cache.
        quarot    QuaRot-style: randomised Hadamard rotation of the residual stream and of every down_proj input,
                  then INT4 groups of 64 without keepers, clip 0.85 / 0.9, GPTQ, INT4 KV cache.
        atom+rotation  both: the rotation, then Atom's 128 INT8 keeper channels on the rotated activations.
        atom-g32  issue 15's W4A4 layers: the atom preset with groups of 32 instead of 64 (weights and activations)
                  and the KV left to the cache (kv_bits=16): pair it with KVFormat(bits=4, key_tokens=32,
                  rope="post") (KIVI keys) in the paged cache or simulate_kv. Chosen on calibration windows only
                  (benchmarks/ablation_w4a4_select.py); 5.27 bits per weight on SmolLM2 against atom's 5.07.
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}. Available presets: {', '.join(PRESETS)}.")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"Unknown AtomConfig field(s) {bad}; fields are: {', '.join(sorted(known))}.")
        return replace(PRESETS[name], **overrides)


_OFF = dict(group_size=None, keeper=0, sort_metric=None)
PRESETS: dict[str, AtomConfig] = {
    "fp16": AtomConfig(w_bits=16, a_bits=16, **_OFF, name="fp16"),
    "w8a8": AtomConfig(w_bits=8, a_bits=8, **_OFF, smooth_alpha=0.5, name="w8a8"),
    "w4a16": AtomConfig(w_bits=4, a_bits=16, group_size=128, keeper=0, sort_metric=None, w_symmetric=False,
                        gptq=True, group_fallback=True, name="w4a16"),
    "w4a4-rtn": AtomConfig(w_bits=4, a_bits=4, **_OFF, name="w4a4-rtn"),
    "atom": AtomConfig(w_bits=4, a_bits=4, group_size=64, keeper=128, keeper_bits=8, w_clip=0.85, a_clip=0.9,
                       sort_metric="hessian", gptq=True, kv_bits=4, name="atom"),
}
PRESETS["quarot"] = PRESETS["atom"].replace(keeper=0, sort_metric=None, rotation="hadamard", name="quarot")
PRESETS["atom+rotation"] = PRESETS["atom"].replace(rotation="hadamard", name="atom+rotation")
PRESETS["atom-g32"] = PRESETS["atom"].replace(group_size=32, kv_bits=16, name="atom-g32")


def ablation_configs(group_size: int = 64, keeper: int = 128) -> list[AtomConfig]:
    """Atom's ablation, one technique added per row, then the baselines (what `atom-lab ablation` runs).

    Rows: w4a4-rtn (per-token activations, per-channel weights); + groups; + reordering with `keeper` INT8
    channels; + clipping (0.85 / 0.9); + GPTQ; + INT4 KV cache (= the "atom" preset); and fp16, w8a8, w4a16.
    """
    rtn = PRESETS["w4a4-rtn"]
    group = rtn.replace(group_size=group_size, name=f"+ group {group_size}")
    reorder = group.replace(keeper=keeper, sort_metric="hessian", name=f"+ reorder, {keeper} INT8 keeper")
    clip = reorder.replace(w_clip=0.85, a_clip=0.9, name="+ clip 0.85 / 0.9")
    gptq = clip.replace(gptq=True, name="+ GPTQ")
    atom = AtomConfig.preset("atom", group_size=group_size, keeper=keeper, name="+ INT4 KV = atom")
    return [PRESETS["fp16"], PRESETS["w8a8"], PRESETS["w4a16"], rtn, group, reorder, clip, gptq, atom]


def rotation_configs(group_size: int = 64, keeper: int = 128) -> list[AtomConfig]:
    """The rows of the ablation issue 15 added: QuaRot-style (rotation + groups + clip + GPTQ, no keepers) and
    Atom + rotation (both), each with a float and with an INT4 KV cache; then the atom-g32 W4A4 layers (groups of 32
    whatever group_size says: that is the row's point; its KIVI KV cache is benchmarks/ablation_kv4.py's row)."""
    quarot = AtomConfig.preset("quarot", group_size=group_size)
    both = AtomConfig.preset("atom+rotation", group_size=group_size, keeper=keeper)
    return [quarot.replace(kv_bits=16, name="quarot W4A4"), quarot.replace(name="quarot W4A4-KV4"),
            both.replace(kv_bits=16, name="atom+rotation W4A4"), both.replace(name="atom+rotation W4A4-KV4"),
            AtomConfig.preset("atom-g32", keeper=keeper, name="atom-g32 W4A4")]
