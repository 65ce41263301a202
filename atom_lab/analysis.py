"""Error analysis: how much a quantized matmul y = x W^T deviates from float, for one layer and one setting.

Every quantizer here is atom_lab.quantizers.fake_quantize_symmetric (the project's contract); this module only decides
which values share a scale:
    per-tensor   one scale for the whole matrix
    per-channel  activations: one scale per input channel (over all tokens); weights: one per output channel (row)
    per-token    activations: one scale per token (row); weights: one per output channel (row)
    per-group    groups of `group_size` consecutive input channels, per row (Atom's format)
With keeper > 0 the LAST `keeper` input channels (the outliers, after reordering) are quantized separately at
`keeper_bits` with one scale per row, as in Atom's packed format (kernels/formats.py); the other K - keeper
channels use the chosen granularity. The error is relative: ||y_q - y||_F / ||y||_F (bias left out), products
in float32, norms in float64.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from atom_lab.quantizers import fake_quantize_symmetric
from atom_lab.reorder import check_keeper, check_permutation, reorder_index
from atom_lab.stats import ChannelStats, layer_index, module_kind

GRANULARITIES = ("per-tensor", "per-channel", "per-token", "per-group")
# The weight's granularity that goes with an activation granularity when only one is given.
WEIGHT_GRANULARITY = {"per-tensor": "per-tensor", "per-channel": "per-channel", "per-token": "per-channel",
                      "per-group": "per-group"}


def _check_values(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError(f"{name} must be a floating-point tensor [..., K], got {getattr(x, 'dtype', type(x))}.")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one row.")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf; quantization needs finite values (check the model's dtype).")


def _check_setting(x: torch.Tensor, bits, granularity: str, group_size, keeper: int, name: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is unknown; use one of {', '.join(GRANULARITIES)}.")
    K = x.shape[-1]
    check_keeper(keeper, K)
    if granularity == "per-group" and keeper < K:
        if not isinstance(group_size, int) or group_size < 1 or (K - keeper) % group_size:
            raise ValueError(f"group_size={group_size} must divide the {K - keeper} non-keeper channels "
                             f"(K={K} - keeper={keeper}); choose a divisor of {K - keeper} or change keeper.")


def _quantize(x: torch.Tensor, bits: int, granularity: str, group_size: int | None, clip: float,
              weight: bool) -> torch.Tensor:
    """x [R, K] -> fake-quantized [R, K], every part through fake_quantize_symmetric."""
    if x.shape[-1] == 0:
        return x
    if granularity == "per-tensor":
        return fake_quantize_symmetric(x.reshape(1, -1), bits, None, clip).reshape(x.shape)
    if granularity == "per-channel" and not weight:  # one scale per input channel: rows of x^T
        return fake_quantize_symmetric(x.t().contiguous(), bits, None, clip).t()
    if granularity == "per-group":
        return fake_quantize_symmetric(x, bits, group_size, clip)
    return fake_quantize_symmetric(x, bits, None, clip)  # per-token (activations) / per-output-channel (weights)


def fake_quantize(x: torch.Tensor, bits: int = 4, granularity: str = "per-group", group_size: int | None = 128,
                  keeper: int = 0, keeper_bits: int = 8, clip: float = 1.0, weight: bool = False) -> torch.Tensor:
    """Quantize-dequantize a matrix as Atom would store it, simulated in float.

    Args:
        x: float [..., K], channels already in Atom's order (outliers last). An activation [tokens, K] or, with
           weight=True, a weight [N, K] (then "per-channel" and "per-token" both mean one scale per output row).
        bits: bits of the K - keeper normal channels.
        granularity: one of GRANULARITIES (see the module docstring).
        group_size: for "per-group": channels per group, dividing K - keeper.
        keeper: the last `keeper` channels are stored at keeper_bits, one scale per row (never clipped).
        clip: clip ratio of the normal channels.
    Returns:
        float tensor of x's shape and dtype.
    """
    _check_values(x, "weight" if weight else "x")
    return _fake_quantize(x, bits, granularity, group_size, keeper, keeper_bits, clip, weight)


def _fake_quantize(x, bits, granularity, group_size, keeper, keeper_bits, clip, weight) -> torch.Tensor:
    """fake_quantize without the finite-values check (sweeps check the values once, not once per setting)."""
    _check_setting(x, bits, granularity, group_size, keeper, "weight" if weight else "x")
    rows = x.reshape(-1, x.shape[-1]).float()
    K = rows.shape[1]
    normal = _quantize(rows[:, : K - keeper], bits, granularity, group_size, clip, weight)
    if keeper:
        outl = fake_quantize_symmetric(rows[:, K - keeper:], keeper_bits, None, 1.0)
        normal = torch.cat([normal, outl], dim=1)
    return normal.reshape(x.shape).to(x.dtype)


def relative_error(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    """||y - y_ref||_F / ||y_ref||_F in float64 (0 when both are zero)."""
    if y.shape != y_ref.shape:
        raise ValueError(f"y {tuple(y.shape)} and y_ref {tuple(y_ref.shape)} must have the same shape.")
    ref = y_ref.double()
    den = ref.norm()
    num = (y.double() - ref).norm()
    return float(num / den) if den > 0 else float(num)


def _prepare(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor | None):
    """Reorder x [T, K] and weight [N, K] by index; return both in float32 on x's device, and x W^T."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor) or x.dim() != 2 or weight.dim() != 2 \
            or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x [T, K] and weight [N, K] must be 2-D tensors sharing K; got x "
                         f"{tuple(getattr(x, 'shape', ()))}, weight {tuple(getattr(weight, 'shape', ()))}.")
    _check_values(x, "x")
    _check_values(weight, "weight")
    if index is not None:
        check_permutation(index, x.shape[1])
        x, weight = x[:, index.to(x.device)], weight[:, index.to(weight.device)]
    xf, wf = x.float(), weight.detach().float().to(x.device)
    # float32 products: their rounding (~1e-6 relative) is far below any quantization error measured here.
    return xf, wf, xf @ wf.t()


def _quantized_error(xf, wf, y_ref, a_bits, w_bits, granularity, group_size, keeper, keeper_bits, a_clip, w_clip,
                     w_granularity) -> float:
    wg = w_granularity or WEIGHT_GRANULARITY.get(granularity, granularity)
    xq = xf if a_bits is None else _fake_quantize(xf, a_bits, granularity, group_size, keeper, keeper_bits, a_clip,
                                                  False)
    wq = wf if w_bits is None else _fake_quantize(wf, w_bits, wg, group_size, keeper, keeper_bits, w_clip, True)
    if a_bits is None and w_bits is None:
        check_keeper(keeper, xf.shape[1])
    return relative_error(xq @ wq.t(), y_ref)


def matmul_error(x: torch.Tensor, weight: torch.Tensor, a_bits: int | None = 4, w_bits: int | None = 4,
                 granularity: str = "per-group", group_size: int | None = 128, keeper: int = 0,
                 index: torch.Tensor | None = None, keeper_bits: int = 8, a_clip: float = 1.0, w_clip: float = 1.0,
                 w_granularity: str | None = None) -> float:
    """Relative output error of the quantized matmul x W^T against float.

    Args:
        x: float activation [T, K] (e.g. ChannelStats.samples), in the layer's original channel order.
        weight: float [N, K] (nn.Linear.weight); moved to x's device.
        a_bits / w_bits: bits of the normal channels of activations / weights; None keeps that side in float.
        granularity: the activations' granularity; the weights use WEIGHT_GRANULARITY[granularity] unless
            w_granularity says otherwise.
        keeper: how many of the last channels (after reordering) stay at keeper_bits, for both x and weight.
        index: LongTensor [K] from reorder_index, applied to x's channels and the weight's columns first;
            None keeps the original order (then the "keeper" channels are just the last ones, not the outliers).
    Returns:
        ||Q(x) Q(W)^T - x W^T||_F / ||x W^T||_F as a float.
    """
    xf, wf, y_ref = _prepare(x, weight, index)
    return _quantized_error(xf, wf, y_ref, a_bits, w_bits, granularity, group_size, keeper, keeper_bits, a_clip,
                            w_clip, w_granularity)


def keeper_sweep(x: torch.Tensor, weight: torch.Tensor, keepers: Iterable[int], index: torch.Tensor | None,
                 a_bits: int | None = 4, w_bits: int | None = 4, granularity: str = "per-group",
                 group_size: int | None = 128, keeper_bits: int = 8, a_clip: float = 1.0, w_clip: float = 1.0,
                 w_granularity: str | None = None) -> torch.Tensor:
    """matmul_error at each keeper count (x, weight and index as there): float64 [len(keepers)].
    Reorders and computes the float product once for the whole sweep."""
    xf, wf, y_ref = _prepare(x, weight, index)
    return torch.tensor([_quantized_error(xf, wf, y_ref, a_bits, w_bits, granularity, group_size, k, keeper_bits,
                                          a_clip, w_clip, w_granularity) for k in keepers], dtype=torch.float64)


def valid_keepers(K: int, group_size: int | None, granularity: str, upto: int = 256, step: int = 16) -> list[int]:
    """Keeper counts in 0..upto (multiples of step) that leave a number of normal channels the setting accepts."""
    ks = range(0, min(upto, K - 1) + 1, step)
    if granularity != "per-group":
        return list(ks)
    return [k for k in ks if (K - k) % group_size == 0]


def layer_error(model: torch.nn.Module, stats: dict[str, ChannelStats], name: str, metric: str | None = "hessian",
                **setting) -> float:
    """matmul_error of one linear layer of `model` on its calibration samples (stats[name].samples).

    Args:
        name: a linear layer's full name, e.g. "model.layers.3.mlp.down_proj" (a key of stats).
        metric: "hessian" or "max" reorders by that statistic before keeping the last `keeper` channels; None
            keeps the original channel order.
        setting: matmul_error's keyword arguments (a_bits, w_bits, granularity, group_size, keeper, ...).
    """
    if name not in stats:
        raise KeyError(f"{name!r} has no statistics; use a key of collect_stats(...), e.g. {next(iter(stats))!r}.")
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, torch.nn.Linear):
        raise TypeError(f"{name!r} is not an nn.Linear of the model (the residual stream has no weight); "
                        "pick a linear layer's name, e.g. one ending in q_proj or down_proj.")
    s = stats[name]
    if s.samples.shape[0] == 0:
        raise ValueError(f"stats[{name!r}] kept no token rows; run collect_stats with keep_tokens >= 1.")
    index = None if metric is None else reorder_index(s, metric)
    return matmul_error(s.samples, module.weight, index=index, **setting)


def outlier_table(stats: dict[str, ChannelStats], blocks_name: str):
    """pandas DataFrame, one row per (layer, module kind): outlier ratio (max over median channel max|x|),
    the largest |x|, the channel holding it, and the share of mean x^2 held by the top 1% of channels."""
    import pandas as pd

    rows = []
    for name, s in stats.items():
        top = max(1, s.channels // 100)
        share = float(torch.topk(s.mean_sq, top).values.sum() / s.mean_sq.sum().clamp_min(1e-30))
        rows.append(dict(layer=layer_index(name, blocks_name), module=module_kind(name), channels=s.channels,
                         ratio=s.outlier_ratio(), max_abs=float(s.max_abs.max()), top_channel=int(s.max_abs.argmax()),
                         top1pct_energy=share))
    return pd.DataFrame(rows)


def outlier_consistency(samples: torch.Tensor, outliers: torch.Tensor) -> float:
    """Share of tokens whose single largest |x| channel is one of `outliers`.

    samples: float [T, C]; outliers: LongTensor [k] channel numbers (e.g. outlier_channels(stats, k)).
    """
    if samples.dim() != 2 or samples.shape[0] == 0:
        raise ValueError(f"samples must be a non-empty [T, C] tensor, got shape {tuple(samples.shape)}.")
    top = samples.abs().argmax(dim=1)
    return float(torch.isin(top, outliers.to(top.device)).float().mean())


def atom_row_bytes(K: int, keeper: int, group_size: int, bits: int = 4, keeper_bits: int = 8,
                   scale_bytes: int = 2) -> float:
    """Bytes to store one row of K channels in Atom's format: normal channels at `bits` with one fp16 scale per
    group, plus `keeper` channels at keeper_bits with one fp16 scale per row (none when keeper == 0).
    Matches PackedAtom.nbytes() per row for bits=4, keeper_bits=8 (tested), apart from its empty-keeper scale."""
    check_keeper(keeper, K)
    normal = K - keeper
    if normal % group_size:
        raise ValueError(f"group_size={group_size} must divide the {normal} non-keeper channels "
                         f"(K={K} - keeper={keeper}); choose a divisor of {normal} or change keeper.")
    keep = keeper * keeper_bits / 8 + (scale_bytes if keeper else 0)
    return normal * bits / 8 + normal // group_size * scale_bytes + keep


def bytes_table(shapes: Sequence[tuple[str, int, int]], keepers: Sequence[int], group_size: int):
    """pandas DataFrame of weight bytes for layers of shape (name, N, K) at each keeper count, against fp16 and
    plain INT4 groups: columns name, keeper, bytes, bits_per_weight, vs_int4 (ratio), vs_fp16 (ratio)."""
    import pandas as pd

    rows = []
    for name, N, K in shapes:
        int4 = N * atom_row_bytes(K, 0, group_size)
        for k in keepers:
            b = N * atom_row_bytes(K, k, group_size)
            rows.append(dict(name=name, keeper=k, bytes=b, bits_per_weight=8 * b / (N * K), vs_int4=b / int4,
                             vs_fp16=b / (2 * N * K)))
    return pd.DataFrame(rows)



def keeper_sweeps(model: torch.nn.Module, calibration: dict[str, ChannelStats], evaluation: dict[str, ChannelStats],
                  names: Sequence[str], keepers: Sequence[int], orderings: Sequence[str] = ("hessian", "max", "none"),
                  **setting) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Error vs keeper count of several linear layers, for several channel orderings.

    The order comes from the calibration statistics, the error is measured on evaluation.samples (e.g. held-out
    text), so the outlier channels are picked and tested on different tokens.
    Args:
        names: linear layer names (keys of both stats dicts).
        orderings: "hessian" / "max" (reorder_index metric) or "none" (keep the last channels as they are).
        setting: matmul_error's keyword arguments other than keeper and index.
    Returns:
        {name: {ordering: (keepers, errors)}}, the format viz.keeper_error_plot and viz.keeper_explorer draw.
    """
    out = {}
    for name in names:
        if name not in calibration or name not in evaluation:
            raise KeyError(f"{name!r} is missing from the statistics; pass names of linear layers that "
                           "collect_stats hooked (e.g. from atom_lab.linear_names(model)).")
        weight = model.get_submodule(name).weight
        x = evaluation[name].samples
        curves = {}
        for order in orderings:
            if order not in ("hessian", "max", "none"):
                raise ValueError(f"ordering {order!r} is unknown; use 'hessian', 'max' or 'none'.")
            index = None if order == "none" else reorder_index(calibration[name], order)
            curves[order] = (list(keepers), keeper_sweep(x, weight, keepers, index, **setting).tolist())
        out[name] = curves
    return out


def average_sweeps(sweeps: dict[str, dict[str, tuple[list[int], list[float]]]]
                   ) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Mean error over layers of the same module kind: {kind: {ordering: (keepers, mean errors)}}."""
    groups: dict[str, list] = {}
    for name, curves in sweeps.items():
        groups.setdefault(module_kind(name), []).append(curves)
    out = {}
    for kind, items in groups.items():
        out[kind] = {}
        for order, (ks, _) in items[0].items():
            errs = torch.tensor([c[order][1] for c in items], dtype=torch.float64).mean(0)
            out[kind][order] = (list(ks), errs.tolist())
    return out
