"""Calibrating one float linear layer: what a QuantLinear stores, computed from the float weight and calibration data.

QuantLinear.from_linear (atom_lab/qlinear.py) validates its arguments, calls calibrate_linear and stores the result
as buffers. The steps here, in order: the reorder index (given, or from the input's channel statistics), the
calibration inputs and Hessian moved into that reordered channel order, the weight and activation clip ratios (a
number from the config, or 'search': the ratio minimising the layer's output error on the calibration inputs), and
the weight's integer levels (GPTQ, or round-to-nearest). stack_linears prepares layers that read one activation
(q/k/v, gate/up) to be calibrated as one stacked matrix (QuantLinear.from_linears).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from atom_lab.config import AtomConfig
from atom_lab.gptq import GPTQResult, column_groups, gptq_quantize, rtn_quantize
from atom_lab.quantizers import fake_quantize_mixed, search_act_clip, search_weight_clip
from atom_lab.reorder import check_permutation, reorder_index


@dataclass
class LinearCalibration:
    """What calibrate_linear found for one nn.Linear(K -> N).

    reorder: int64 [K] or None (input channel reorder[i] goes to position i).
    weight:  float32 [N, K], the float weight in reordered column order.
    group_size: the config's INT4 group size for this layer (None: per channel).
    a_clip, w_clip: the activation and weight clip ratios (floats; 'search' resolved).
    levels:  the quantized weight (GPTQ or RTN) in reordered column order; None when w_bits >= 16.
    """
    reorder: torch.Tensor | None
    weight: torch.Tensor
    group_size: int | None
    a_clip: float
    w_clip: float
    levels: GPTQResult | None


def _reordered_inputs(inputs, hessian, stats, reorder, K: int, where: str, dev):
    """Calibration inputs float32 [T, K] and Hessian float32 [K, K] (either may be None) in reordered order."""
    if inputs is None and stats is not None and stats.samples.numel():
        inputs = stats.samples
    if inputs is not None:
        if inputs.shape[-1] != K:
            raise ValueError(f"inputs have {inputs.shape[-1]} channels but {where} has in_features={K}.")
        inputs = inputs.reshape(-1, K).to(dev, torch.float32)
        if reorder is not None:
            inputs = inputs[:, reorder]
    if hessian is not None:
        if hessian.shape != (K, K):
            raise ValueError(f"hessian must be [{K}, {K}] for {where}, got {tuple(hessian.shape)}.")
        hessian = hessian.to(dev, torch.float32)
        if reorder is not None:
            hessian = hessian[reorder][:, reorder]
    return inputs, hessian


def _resolve_reorder(config: AtomConfig, K: int, stats, reorder, where: str, dev) -> torch.Tensor | None:
    if config.reorders:
        if reorder is None:
            if stats is None:
                raise ValueError(f"config.sort_metric={config.sort_metric!r} reorders channels: pass stats= "
                                 f"(atom_lab.collect_stats) or reorder= (atom_lab.reorder_index) for {where}.")
            reorder = reorder_index(stats, config.sort_metric)
        check_permutation(reorder, K, "reorder")
        return reorder.to(dev)
    if reorder is not None:
        raise ValueError(f"reorder= was given but config.sort_metric is None (no reordering); set sort_metric "
                         f"or leave reorder out ({where}).")
    return None


@torch.no_grad()
def calibrate_linear(linear: torch.nn.Linear, config: AtomConfig, where: str, stats=None,
                     reorder: torch.Tensor | None = None, hessian: torch.Tensor | None = None,
                     inputs: torch.Tensor | None = None) -> LinearCalibration:
    """Reorder, clip ratios and weight levels of one nn.Linear (weight [N, K]); arguments as QuantLinear.from_linear.

    where: the layer's name for error messages.
    """
    N, K = linear.weight.shape
    G = config.layer_group_size(K, where)
    dev = linear.weight.device
    reorder = _resolve_reorder(config, K, stats, reorder, where, dev)
    inputs, hessian = _reordered_inputs(inputs, hessian, stats, reorder, K, where, dev)

    W = linear.weight.detach().float()
    if reorder is not None:
        W = W[:, reorder]
    layout = lambda clip: column_groups(K, config.w_bits, G, config.keeper,  # noqa: E731
                                        config.keeper_bits, clip, config.w_symmetric)

    w_clip, a_clip = config.w_clip, config.a_clip
    if "search" in (w_clip, a_clip) and inputs is None:
        raise ValueError(f"clip 'search' needs calibration inputs for {where}: pass inputs= or stats= with "
                         "samples.")
    if w_clip == "search":
        w_clip = 1.0 if config.w_bits >= 16 else search_weight_clip(
            W, inputs, lambda w, c: rtn_quantize(w, layout(c)).weight)[0]
    if a_clip == "search":
        a_clip = 1.0 if config.a_bits >= 16 else search_act_clip(
            inputs, W, lambda x, c: fake_quantize_mixed(x, config.a_bits, G, config.keeper, config.keeper_bits,
                                                        c, config.a_symmetric))[0]
    if config.w_bits >= 16:
        return LinearCalibration(reorder, W, G, a_clip, w_clip, None)
    if config.gptq:
        if hessian is None:
            if inputs is None:
                raise ValueError(f"config.gptq needs calibration inputs for {where}: pass hessian= (X^T X), "
                                 "inputs= or stats= with samples (quantize_model does this for you).")
            hessian = inputs.T @ inputs
        levels = gptq_quantize(W, hessian, layout(w_clip), config.gptq_damp, config.gptq_block)
    else:
        levels = rtn_quantize(W, layout(w_clip))
    return LinearCalibration(reorder, W, G, a_clip, w_clip, levels)


def stack_linears(linears: list[torch.nn.Linear], names: list[str]) -> tuple[torch.nn.Linear, str]:
    """Linears reading one activation (weights [N_i, K]) as one bias-free nn.Linear [sum N_i, K], and its label
    ("model.layers.0.self_attn.q_proj+k_proj+v_proj" style) for error messages."""
    if not linears or any(not isinstance(m, torch.nn.Linear) for m in linears):
        raise TypeError("linears must be a non-empty list of torch.nn.Linear.")
    K = linears[0].in_features
    if any(m.in_features != K for m in linears):
        raise ValueError(f"linears reading one activation must share in_features; got "
                         f"{[m.in_features for m in linears]}.")
    w = linears[0].weight
    fused = torch.nn.utils.skip_init(torch.nn.Linear, K, sum(m.out_features for m in linears), bias=False,
                                     device=w.device, dtype=w.dtype)
    fused.weight.copy_(torch.cat([m.weight for m in linears]))
    label = (names[0].rsplit(".", 1)[0] + "." if "." in names[0] else "") + "+".join(
        n.rsplit(".", 1)[-1] for n in names)
    return fused, label
