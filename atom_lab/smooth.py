"""SmoothQuant (Xiao et al., ICML 2023) smoothing: move activation outliers into the weights before W8A8.

For a linear y = x W^T and a per-input-channel scale s > 0, y = (x / s) (W * s)^T exactly. SmoothQuant picks
    s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha)
so a channel whose activations are large gets divided down and its weight column multiplied up; alpha = 0.5
balances the two. The division by s is folded into whatever produced x, so it costs nothing at run time:
    q/k/v inputs    <- input_layernorm weight           (the three layers share s)
    gate/up inputs  <- post_attention_layernorm weight  (shared)
    o_proj input    <- v_proj output rows (exact: attention mixes tokens, not channels; with grouped-query
                       attention one v channel feeds every query head of its group, so s is shared across them)
    down_proj input <- up_proj output rows (exact: down's input is act(gate) * up, linear in up)
The official SmoothQuant code for Llama smooths only the two norms; the v->o and up->down pairs are the
"preceding linear" case, used here because SmolLM2's worst outliers sit in down_proj's input.
"""
from __future__ import annotations

import torch

from atom_lab.stats import ChannelStats, decoder_layers, decoder_layers_name

_EPS = 1e-5


def smooth_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's per-channel scales. act_max: float [K] (max|x| per input channel); weights: [N_i, K] each.
    Returns float32 [K], clamped away from 0."""
    w_max = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    s = act_max.float().clamp(min=_EPS).pow(alpha) / w_max.clamp(min=_EPS).pow(1.0 - alpha)
    return s.clamp(min=_EPS)


@torch.no_grad()
def smooth_model(model, stats: dict[str, ChannelStats], alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Apply SmoothQuant smoothing IN PLACE to every decoder block (llama / mistral / qwen2 layout).

    Args:
        model: transformers decoder; stats: collect_stats(model, ...) of the float model (max_abs is used).
        alpha: migration strength in [0, 1].
    Returns:
        {linear name: scales [K]} applied to each linear's input (the model's function is unchanged up to float
        rounding).
    """
    blocks_name = decoder_layers_name(model)
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    applied = {}
    for i, block in enumerate(decoder_layers(model)):
        pre = f"{blocks_name}.{i}."
        try:
            attn, mlp = block.self_attn, block.mlp
            pairs = [(block.input_layernorm, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                     (block.post_attention_layernorm, ("mlp.gate_proj", "mlp.up_proj"))]
        except AttributeError as e:
            raise NotImplementedError(f"smooth_model supports llama/mistral/qwen2-style blocks (input_layernorm, "
                                      f"self_attn.q/k/v/o_proj, mlp.gate/up/down_proj); {type(block).__name__} "
                                      f"differs: {e}") from e
        for norm, names in pairs:
            linears = [block.get_submodule(n) for n in names]
            if not hasattr(norm, "weight") or norm.weight is None:
                raise NotImplementedError(f"{pre}{names[0]}: the preceding norm has no weight to fold the scale into.")
            s = smooth_scales(stats[pre + names[0]].max_abs.to(norm.weight.device), [m.weight for m in linears],
                              alpha)
            norm.weight.div_(s.to(norm.weight.dtype))
            if getattr(norm, "bias", None) is not None:
                norm.bias.div_(s.to(norm.bias.dtype))
            for m in linears:
                m.weight.mul_(s.to(m.weight.dtype))
            for n in names:
                applied[pre + n] = s
        # v -> o: one scale per v channel (kv head, d), shared by the n_rep query heads that read that kv head.
        n_rep = heads // kv_heads
        x_max = stats[pre + "self_attn.o_proj"].max_abs.to(attn.o_proj.weight.device).float()
        x_max = x_max.view(kv_heads, n_rep, head_dim).amax(dim=1)
        w_max = attn.o_proj.weight.abs().amax(dim=0).float().view(kv_heads, n_rep, head_dim).amax(dim=1)
        s_v = (x_max.clamp(min=_EPS).pow(alpha) / w_max.clamp(min=_EPS).pow(1 - alpha)).clamp(min=_EPS).flatten()
        attn.v_proj.weight.div_(s_v.unsqueeze(1).to(attn.v_proj.weight.dtype))
        if attn.v_proj.bias is not None:
            attn.v_proj.bias.div_(s_v.to(attn.v_proj.bias.dtype))
        s_o = s_v.view(kv_heads, 1, head_dim).expand(kv_heads, n_rep, head_dim).reshape(-1)
        attn.o_proj.weight.mul_(s_o.to(attn.o_proj.weight.dtype))
        applied[pre + "self_attn.o_proj"] = s_o
        # up -> down
        s_d = smooth_scales(stats[pre + "mlp.down_proj"].max_abs.to(mlp.down_proj.weight.device),
                            [mlp.down_proj.weight], alpha)
        mlp.up_proj.weight.div_(s_d.unsqueeze(1).to(mlp.up_proj.weight.dtype))
        if mlp.up_proj.bias is not None:
            mlp.up_proj.bias.div_(s_d.to(mlp.up_proj.bias.dtype))
        mlp.down_proj.weight.mul_(s_d.to(mlp.down_proj.weight.dtype))
        applied[pre + "mlp.down_proj"] = s_d
    return applied
