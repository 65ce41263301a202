"""Channel reordering: Atom's trick for mixed precision without scattered outliers.

Sorting the input channels of a linear layer so the outlier channels come LAST lets a kernel treat the first
K - keeper channels as one dense INT4 block and the last `keeper` as one dense INT8 block. The product is unchanged
because y = x W^T = sum_k x[k] W[:, k] is a sum over channels, and a sum does not care about order:
    x[..., idx] @ W[:, idx]^T == x @ W^T
The weight columns are permuted once, offline; the activation gather x[..., idx] is fused into the kernel that
already reads x (the RMSNorm or SiLU*up before the layer), so reordering costs nothing at run time.
"""
from __future__ import annotations

import torch

from atom_lab.stats import ChannelStats

METRICS = {"hessian": "mean_sq", "max": "max_abs"}


def channel_scores(stats: ChannelStats | torch.Tensor, metric: str = "hessian") -> torch.Tensor:
    """Per-channel outlier scores: float [C]. stats: a ChannelStats, or a 1-D float tensor of scores [C]."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is unknown; use 'hessian' (mean x^2, Atom's default) or 'max' (max|x|).")
    if isinstance(stats, ChannelStats):
        scores = getattr(stats, METRICS[metric])
    elif isinstance(stats, torch.Tensor):
        scores = stats
    else:
        raise TypeError(f"stats must be a ChannelStats or a 1-D float tensor of per-channel scores, "
                        f"got {type(stats).__name__}.")
    if scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError(f"per-channel scores must be a 1-D float tensor [C], got shape {tuple(scores.shape)} "
                         f"dtype {scores.dtype}.")
    if scores.numel() == 0:
        raise ValueError("per-channel scores are empty (C = 0): collect statistics on a layer with input channels.")
    if torch.isnan(scores).any():
        bad = torch.isnan(scores).nonzero().flatten()[:5].tolist()
        raise ValueError(f"per-channel scores contain NaN (channels {bad}...): the calibration activations "
                         "overflowed or the model produced NaN; check the model's dtype and the calibration text.")
    return scores


def reorder_index(stats: ChannelStats | torch.Tensor, metric: str = "hessian") -> torch.Tensor:
    """A permutation of the C input channels, ascending by the outlier metric, so the outliers come LAST.

    Args:
        stats: ChannelStats, or a 1-D float tensor of per-channel scores [C].
        metric: "hessian" (mean x^2, Atom's default) or "max" (max |x|).
    Returns:
        LongTensor [C] on the scores' device: channel index[i] goes to position i. The last `keeper` entries are
        the channels Atom keeps at INT8. Ties (constant channels included) keep channel-index order (stable sort),
        so the result is deterministic.
    """
    scores = channel_scores(stats, metric)
    return torch.sort(scores.float(), stable=True).indices


def outlier_channels(stats: ChannelStats | torch.Tensor, keeper: int, metric: str = "hessian") -> torch.Tensor:
    """The `keeper` channel numbers with the largest scores, smallest score first: LongTensor [keeper]."""
    index = reorder_index(stats, metric)
    check_keeper(keeper, index.numel())
    return index[index.numel() - keeper:]


def check_keeper(keeper: int, channels: int) -> None:
    """Raise a clear error unless 0 <= keeper <= channels."""
    if not isinstance(keeper, int) or isinstance(keeper, bool) or keeper < 0:
        raise ValueError(f"keeper must be an int >= 0 (how many outlier channels stay at INT8), got {keeper!r}.")
    if keeper > channels:
        raise ValueError(f"keeper={keeper} is larger than the channel count {channels}; "
                         f"choose keeper <= {channels} (Atom uses 128).")


def check_permutation(index: torch.Tensor, channels: int, name: str = "index") -> None:
    """Raise a clear error unless index is a LongTensor [channels] holding each of 0..channels-1 once."""
    if not isinstance(index, torch.Tensor) or index.dtype != torch.long or index.dim() != 1:
        raise TypeError(f"{name} must be a 1-D torch.long tensor (from reorder_index), got "
                        f"{getattr(index, 'dtype', type(index).__name__)} shape {tuple(getattr(index, 'shape', ()))}.")
    if index.numel() != channels:
        raise ValueError(f"{name} has {index.numel()} entries but the layer has {channels} input channels; "
                         "compute it from the statistics of this layer's input.")
    if not torch.equal(torch.sort(index.cpu()).values, torch.arange(channels)):
        raise ValueError(f"{name} is not a permutation of 0..{channels - 1} (repeated or missing channels).")


def inverse_permutation(index: torch.Tensor) -> torch.Tensor:
    """inv such that x[..., index][..., inv] == x: LongTensor [C]."""
    inv = torch.empty_like(index)
    inv[index] = torch.arange(index.numel(), device=index.device)
    return inv


def reorder_activation(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[..., index]: x [..., C], index LongTensor [C] -> [..., C], same dtype (a gather; kernels fuse it)."""
    check_permutation(index, x.shape[-1])
    return x[..., index.to(x.device)]


def reorder_linear(linear: torch.nn.Linear, index: torch.Tensor) -> torch.nn.Linear:
    """A new nn.Linear whose weight columns (input channels) are permuted by index; the bias is unchanged.

    Args:
        linear: nn.Linear with weight [N, K].
        index: LongTensor [K] from reorder_index.
    Returns:
        nn.Linear with weight [N, K] = linear.weight[:, index], same dtype and device, so that
        new(reorder_activation(x, index)) == linear(x) up to the order of a float sum.
    """
    return _permuted_copy(linear, index, dim=1)


def permute_linear_outputs(linear: torch.nn.Linear, index: torch.Tensor) -> torch.nn.Linear:
    """A new nn.Linear whose output channels (weight rows, bias entries) are permuted: new(x) == linear(x)[..., index].

    Why: down_proj reads silu(gate(x)) * up(x), an elementwise product, so permuting the rows of gate_proj and
    up_proj offline hands down_proj its input already reordered: no gather at all at run time.
    linear: weight [N, K]; index: LongTensor [N].
    """
    return _permuted_copy(linear, index, dim=0)


def _permuted_copy(linear: torch.nn.Linear, index: torch.Tensor, dim: int) -> torch.nn.Linear:
    """A new nn.Linear with the weight permuted along dim (1: input columns, 0: output rows and the bias)."""
    if not isinstance(linear, torch.nn.Linear):
        raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}.")
    check_permutation(index, linear.in_features if dim == 1 else linear.out_features)
    w = linear.weight
    index = index.to(w.device)
    new = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w.index_select(dim, index))
        if linear.bias is not None:
            new.bias.copy_(linear.bias if dim == 1 else linear.bias[index])
    return new.train(linear.training)


def rmsnorm_reorder_ref(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference of a fused RMSNorm + reorder: rmsnorm(x)[..., index] in one pass over x.

    The mean of x^2 does not depend on channel order, so a kernel that already reads the whole row for the norm
    can write output channel i from input channel index[i]: the gather costs no extra memory traffic.
    x: [..., C] any float dtype; weight: [C] (the norm's gamma); index: LongTensor [C]. Returns x's dtype, [..., C],
    computed like transformers' LlamaRMSNorm (float32 inside).
    """
    check_permutation(index, x.shape[-1])
    xf = x.float()
    inv_rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    idx = index.to(x.device)
    return weight[idx] * (xf[..., idx] * inv_rms).to(x.dtype)
