"""Why rotation does or does not help a model: the INT4 error of single layers, unrotated vs rotated, one at a time.

For chosen linear layers of a float model and of the same model after atom_lab.rotate_model, each layer is
quantized alone (atom_lab.QuantLinear.from_linear) on its own calibration inputs, and the relative error of its
output ||y_q - y|| / ||y|| on those inputs is measured, for a few settings:

    a4        activations only (INT4 groups, clip), float weights
    w4 gptq   weights only (INT4 groups, clip, GPTQ on the layer's own Hessian), float activations
    w4a4      both, round-to-nearest (groups of G, clip)
    w4a4 k128 both, with Atom's 128 INT8 keeper channels (reordered by mean x^2 of these inputs)

It needs no perplexity run (a few layers, 1-2k calibration tokens: about a minute on one CPU core), which is how
the ablation's "atom + rotation is worse than atom" on SmolLM2 was explained (README, rotation section).

    python -m atom_lab.rotation_analysis --json benchmarks/results/ablation_smollm2_rotation_layers.json
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from atom_lab.config import AtomConfig
from atom_lab.qlinear import QuantLinear
from atom_lab.recipe import layer_inputs
from atom_lab.rotation import rotate_model

LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def settings(group_size: int = 64, keeper: int = 128, w_clip: float = 0.85, a_clip: float = 0.9) -> dict:
    """The per-layer settings compared (module docstring): {label: AtomConfig}."""
    off = dict(group_size=group_size, keeper=0, sort_metric=None)
    return {"a4": AtomConfig(w_bits=16, a_clip=a_clip, **off),
            "w4 gptq": AtomConfig(a_bits=16, w_clip=w_clip, gptq=True, **off),
            "w4a4": AtomConfig(w_clip=w_clip, a_clip=a_clip, **off),
            f"w4a4 k{keeper}": AtomConfig(group_size=group_size, keeper=keeper, sort_metric="hessian", w_clip=w_clip,
                                         a_clip=a_clip)}


@torch.no_grad()
def layer_error(linear: torch.nn.Linear, x: torch.Tensor, config: AtomConfig) -> float:
    """||QuantLinear(linear)(x) - linear(x)|| / ||linear(x)|| with the layer quantized on x itself. x: float [T, K]."""
    y = x @ linear.weight.T.float()
    reorder = torch.argsort(x.square().mean(0)) if config.keeper else None  # outliers (largest mean x^2) last
    q = QuantLinear.from_linear(linear, config, reorder=reorder, hessian=x.T @ x if config.gptq else None,
                                inputs=x[:256])
    return float((q(x) - y).norm() / y.norm())


@torch.no_grad()
def compare(model, tokenizer, texts, blocks, linears=LINEARS, n_tokens: int = 1024, kind: str = "hadamard",
            seed: int = 0, configs: dict | None = None) -> list[dict]:
    """Per-layer errors of `model` and of a rotated copy (rotate_model(kind, seed), online down_proj rotation).

    Returns: one row per layer {"layer", "max_abs": [plain, rotated], "max_over_median": [..], setting: [plain,
    rotated], ...}; max_over_median is the largest channel's max|x| over the median channel's (outlier channels).
    """
    configs = configs or settings()
    rotated = rotate_model(copy.deepcopy(model), kind, seed)
    names = [f"model.layers.{b}.{n}" for b in blocks for n in linears]
    xs = [layer_inputs(m, tokenizer, texts, names, n_tokens=n_tokens) for m in (model, rotated)]
    rows = []
    for n in names:
        row = {"layer": n}
        for label, c in configs.items():
            row[label] = [round(layer_error(m.get_submodule(n), x[n], c), 4) for m, x in zip((model, rotated), xs)]
        a = [x[n].abs().amax(0) for x in xs]
        row["max_abs"] = [round(float(v.max()), 2) for v in a]
        row["max_over_median"] = [round(float(v.max() / v.median()), 2) for v in a]
        rows.append(row)
    return rows


def main(argv=None) -> int:
    import atom_lab

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--blocks", default="1,8,15,22,29")
    p.add_argument("--tokens", type=int, default=1024, help="calibration tokens (calibration split) per layer")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.time()
    model, tok = atom_lab.load_model(args.model)
    texts = atom_lab.load_corpus()["calibration"]["text"]
    configs = settings()
    rows = compare(model, tok, texts, [int(b) for b in args.blocks.split(",")], n_tokens=args.tokens, configs=configs)
    print(f"{'layer':34}" + "".join(f"{k:>18}" for k in configs) + f"{'max|x|':>16}")
    for r in rows:
        print(f"{r['layer']:34}" + "".join(f"{r[k][0]:>9.3f}->{r[k][1]:<7.3f}" for k in configs)
              + f"{r['max_abs'][0]:>8.1f}->{r['max_abs'][1]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"what": "relative output error of single layers quantized alone on their own calibration "
                               "inputs, [unrotated, rotated] (atom_lab.rotation_analysis)",
                       "model": args.model, "tokens": args.tokens, "calibration": "wiki/calibration",
                       "rotation": "randomised Hadamard of the residual stream (seed 0) + online down_proj (seed 1)",
                       "settings": {k: c.to_dict() for k, c in configs.items()}, "seconds": round(time.time() - t0),
                       "environment": atom_lab.environment(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
