"""quantize_model / QuantLinear end to end on tiny llama, mistral and qwen2 decoders, and the accuracy metrics."""
import copy
import math

import pytest
import torch

import atom_lab
from atom_lab import AtomConfig, QuantLinear, evaluate, kl_divergence, quantize_model, top1_agreement
from atom_lab.kernels import dequantize_atom_ref, quantize_atom_ref
from atom_lab.quantizers import fake_quantize_asymmetric, fake_quantize_symmetric
from atom_lab.recipe import SHARED_INPUTS, model_size_report
from atom_lab.smooth import smooth_model

TEXTS = [f"Article {i}: the {w} of {v} was measured at {i * 7} units, then again in {1900 + i}." * 6
         for i, (w, v) in enumerate([("speed", "light"), ("mass", "iron"), ("heat", "water"), ("age", "rock")] * 5)]
CAL = dict(calibration=TEXTS, n_tokens=1024, seq_len=128, progress=False)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids.to(model.device), use_cache=False).logits


def _ids():
    return torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("preset", list(atom_lab.PRESETS))
def test_every_preset_end_to_end(tiny, preset):
    arch, model, tok = tiny
    ref = _logits(model, _ids())
    q = quantize_model(copy.deepcopy(model), preset, tokenizer=tok, **CAL)
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    n_linear = 7 * model.config.num_hidden_layers
    assert len(layers) == (0 if preset == "fp16" else n_linear)
    out = _logits(q, _ids())
    assert torch.isfinite(out).all()
    kl = kl_divergence(ref[0], out[0]).item()
    if preset == "fp16":
        assert torch.equal(out, ref)
    else:
        assert 0 < kl < 0.1, (arch, preset, kl)
    if preset == "atom":
        assert all(m.is_packed for m in layers) and all(m.reorder is not None for m in layers)
        assert all(m.out_bits == 4 for m in layers if m.name.endswith(("k_proj", "v_proj")))
    assert q.atom_config == AtomConfig.preset(preset)


def test_quantize_model_works_in_place_and_refuses_twice():
    model, tok = atom_lab.tiny_model("llama")
    q = quantize_model(model, "w4a4-rtn", tokenizer=tok, **CAL)
    assert q is model
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "w4a4-rtn", tokenizer=tok, **CAL)


def test_shared_activations_share_one_reorder_index():
    model, tok = atom_lab.tiny_model("llama")
    config = AtomConfig.preset("atom", gptq=False)
    quantize_model(model, config, tokenizer=tok, **CAL)
    for block in model.model.layers:
        idx = [[block.get_submodule(n).reorder for n in names] for names in SHARED_INPUTS]
        assert all(torch.equal(i, group[0]) for group in idx for i in group)
        # q/k/v share one clip too (the activation is quantized once); the four activations differ in order
        assert not torch.equal(idx[0][0], idx[2][0]) and not torch.equal(idx[1][0], idx[3][0])


def test_atom_reference_path_is_the_packed_format():
    """QuantLinear's forward = gather, dequantize_atom_ref(quantize_atom_ref(x)), matmul with the packed weight."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=True)
    x = torch.randn(2, 5, 256) * torch.rand(256) * 10
    idx = torch.randperm(256)
    config = AtomConfig.preset("atom", gptq=False, kv_bits=16)
    q = QuantLinear.from_linear(lin, config, reorder=idx)
    p = q.packed
    assert p.group_size == 64 and p.keeper == 128 and p.q4.shape == (96, 64) and p.q8.shape == (96, 128)
    # RTN weights: the packed weight is quantize_atom_ref of the reordered weight with w_clip
    w_packed = quantize_atom_ref(lin.weight.detach()[:, idx], 64, 128, clip=0.85)
    assert all(torch.equal(getattr(p, f), getattr(w_packed, f)) for f in ("q4", "s4", "q8", "s8"))
    xa = dequantize_atom_ref(quantize_atom_ref(x[..., idx].reshape(-1, 256), 64, 128, clip=0.9))
    expected = torch.nn.functional.linear(xa, dequantize_atom_ref(p), lin.bias).reshape(2, 5, 96)
    assert torch.equal(q(x), expected)
    assert q.nbytes() == p.nbytes() + 96 * 4 + 256 * 8  # packed weight + float32 bias + int64 index


def test_gptq_layer_lands_in_the_packed_format():
    torch.manual_seed(1)
    lin = torch.nn.Linear(256, 64, bias=False)
    X = torch.randn(512, 256) @ torch.randn(256, 256) * 0.2
    config = AtomConfig.preset("atom", kv_bits=16)
    idx = torch.randperm(256)
    q = QuantLinear.from_linear(lin, config, reorder=idx, hessian=X.T @ X)
    rtn = QuantLinear.from_linear(lin, config.replace(gptq=False), reorder=idx)
    assert torch.equal(q.w_ref, dequantize_atom_ref(q.packed))
    y = X @ lin.weight.detach().T
    err = lambda m: ((X[:, idx] @ m.w_ref.T - y) ** 2).mean()  # noqa: E731
    assert err(q) < err(rtn)


def test_kv_cache_quantization_per_token_per_head():
    torch.manual_seed(2)
    lin = torch.nn.Linear(64, 128)
    x = torch.randn(3, 7, 64)
    q = QuantLinear.from_linear(lin, AtomConfig.preset("fp16", kv_bits=4), out_bits=4, out_group=64)
    y = lin(x).detach()
    assert torch.equal(q(x), fake_quantize_asymmetric(y, 4, 64))
    with pytest.raises(ValueError, match="out_group=48"):
        QuantLinear.from_linear(lin, AtomConfig.preset("fp16", kv_bits=4), out_bits=4, out_group=48)


def test_w4a4_rtn_layer_by_hand_formula():
    torch.manual_seed(3)
    lin = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(4, 64)
    q = QuantLinear.from_linear(lin, AtomConfig.preset("w4a4-rtn"))
    expected = torch.nn.functional.linear(fake_quantize_symmetric(x, 4), fake_quantize_symmetric(lin.weight.detach(), 4))
    assert torch.equal(q(x), expected)
    assert q.w_q.dtype == torch.int8 and q.w_scale.shape == (32, 1)
    assert q.nbytes() == 32 * 64 + 32 * 2


def test_from_linear_errors():
    lin = torch.nn.Linear(256, 8)
    with pytest.raises(ValueError, match="backend='triton'.*reference"):  # w8a8 is not packed: no kernel for it
        QuantLinear.from_linear(lin, AtomConfig.preset("w8a8"), backend="triton")
    with pytest.raises(ValueError, match="stats=.*reorder="):
        QuantLinear.from_linear(lin, AtomConfig.preset("atom"))
    with pytest.raises(ValueError, match="gptq needs calibration inputs"):
        QuantLinear.from_linear(lin, AtomConfig.preset("atom"), reorder=torch.arange(256))
    with pytest.raises(ValueError, match="not a permutation"):
        QuantLinear.from_linear(lin, AtomConfig.preset("atom"), reorder=torch.zeros(256, dtype=torch.long))
    with pytest.raises(ValueError, match=r"group_size=128 does not divide the 128 normal.*|keeper"):
        QuantLinear.from_linear(torch.nn.Linear(192, 8), AtomConfig.preset("atom", group_size=128),
                                reorder=torch.arange(192))
    with pytest.raises(TypeError, match="AtomConfig"):
        QuantLinear.from_linear(lin, "atom")


def test_quantize_model_needs_calibration_and_a_known_backend():
    model, tok = atom_lab.tiny_model("llama")
    with pytest.raises(ValueError, match="calibration=texts"):
        quantize_model(model, "atom")
    with pytest.raises(ValueError, match="supported backends: reference"):
        quantize_model(model, "w4a4-rtn", backend="cuda")
    with pytest.raises(ValueError, match="group_size=128 does not divide"):
        quantize_model(model, AtomConfig.preset("atom", keeper=64, group_size=128), tokenizer=tok, **CAL)


def test_smoothing_keeps_the_function(tiny):
    arch, model, tok = tiny
    ref = _logits(model, _ids())
    stats = atom_lab.collect_stats(model, tok, TEXTS, n_tokens=512, seq_len=128, residual=False, progress=False)
    m = copy.deepcopy(model)
    scales = smooth_model(m, stats, alpha=0.5)
    assert len(scales) == 7 * model.config.num_hidden_layers
    assert torch.allclose(_logits(m, _ids()), ref, atol=1e-3, rtol=1e-3)
    # and it shrinks the largest activation outlier of q/k/v's input
    s = scales["model.layers.0.self_attn.q_proj"].cpu()  # on the model's device; the statistics live on the CPU
    before = stats["model.layers.0.self_attn.q_proj"].max_abs
    assert (before / s).max() < before.max()


def test_size_report():
    model, tok = atom_lab.tiny_model("llama")
    quantize_model(model, AtomConfig.preset("atom", gptq=False), tokenizer=tok, **CAL)
    r = model_size_report(model)
    assert r["quantized_layers"] == 14 and r["linear_layers"] == 14
    assert 0.25 < r["ratio_vs_fp16"] < 0.45  # 4-bit groups + 128 INT8 channels + scales + index


def test_kl_and_top1_by_hand():
    ref = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    assert kl_divergence(ref, ref).item() == 0.0
    # p = (1/2, 1/2), q = (e/(1+e), 1/(1+e)): KL = log 2 ... computed in closed form
    q = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    pe = math.e / (1 + math.e)
    expected0 = 0.5 * math.log(0.5 / pe) + 0.5 * math.log(0.5 / (1 - pe))
    kl = kl_divergence(ref, q, reduction="none")
    assert kl[0].item() == pytest.approx(expected0, rel=1e-5) and kl[1].item() == pytest.approx(0.0, abs=1e-6)
    assert top1_agreement(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 0.0], [3.0, 1.0]])) == 0.5


def test_evaluate_matches_perplexity_and_compares_models():
    model, tok = atom_lab.tiny_model("qwen2")
    q = quantize_model(copy.deepcopy(model), "w4a4-rtn")
    windows = atom_lab.eval_windows(tok, TEXTS, 64, 3)
    r = evaluate({"float": model, "rtn": q}, windows, reference=model, progress=False)
    ppl = atom_lab.perplexity(model, tok, TEXTS, 64, 3, progress=False)
    assert r["float"]["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert r["float"]["kl"] == pytest.approx(0.0, abs=1e-6) and r["float"]["top1"] == 1.0
    assert r["rtn"]["kl"] > 0 and r["rtn"]["top1"] < 1.0 and r["rtn"]["tokens"] == 3 * 63
    assert evaluate(q, windows, progress=False)["model"]["kl"] is None


def test_ablation_cli_arguments():
    from atom_lab.cli import build_parser

    args = build_parser().parse_args(["ablation", "--max-windows", "2", "--json", "x.json", "--rows", "+ GPTQ"])
    assert args.func.__name__ == "_cmd_ablation" and args.max_windows == 2 and args.seq_len == 2048
    assert args.model == "smollm2-135m" and args.group_size == 64 and args.keeper == 128
