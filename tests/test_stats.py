"""collect_stats against a direct computation, on every tiny architecture; decoder discovery; bad input."""
import warnings

import pytest
import torch

import atom_lab
from atom_lab.stats import ChannelStats, calibration_windows, collect_stats, decoder_layers, decoder_layers_name

# Plain ASCII text: the tiny models use a byte tokenizer, so 1 character = 1 token (plus a possible BOS).
TEXTS = [f"Article {i}: the quick brown fox number {i * 7} jumps over {i % 5} lazy dogs." for i in range(12)]
N_TOKENS, SEQ_LEN, KEEP = 300, 128, 200  # windows of 128, 128 and 44 tokens; samples span two windows


def _direct(model, tok, texts, n_tokens, seq_len):
    """Every hooked tensor stored whole (fine for a tiny model), with the residual stream taken from
    output_hidden_states instead of hooks, so the streaming sums are checked against a different route."""
    ids = tok("\n\n".join(texts), return_tensors="pt").input_ids[0][:n_tokens]
    blocks = decoder_layers(model)
    seen, hidden = {}, {}

    def keep(name):
        return lambda mod, args, out: seen.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_modules()
               if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for start in range(0, ids.numel(), seq_len):
            out = model(ids[start: start + seq_len].unsqueeze(0), output_hidden_states=True, use_cache=False)
            for i in range(len(blocks)):  # hidden_states[i] is the input of block i
                hidden.setdefault(f"model.layers.{i}.residual", []).append(out.hidden_states[i][0])
    for h in handles:
        h.remove()
    return {k: torch.cat(v).double() for k, v in (seen | hidden).items()}, ids.numel()


def test_stats_match_direct_computation(tiny):
    arch, model, tok = tiny
    stats = collect_stats(model, tok, TEXTS, n_tokens=N_TOKENS, seq_len=SEQ_LEN, keep_tokens=KEEP, progress=False)
    direct, n = _direct(model, tok, TEXTS, N_TOKENS, SEQ_LEN)
    assert n == N_TOKENS
    assert set(stats) == set(direct) and len(stats) == 2 * 7 + 2, arch
    for name, x in direct.items():
        s = stats[name]
        assert isinstance(s, ChannelStats) and s.n_tokens == N_TOKENS and s.channels == x.shape[1]
        for t in (s.max_abs, s.mean_sq, s.mean_abs, s.samples):
            assert t.dtype == torch.float32 and t.device.type == "cpu"
        torch.testing.assert_close(s.max_abs, x.abs().amax(0).float(), rtol=0, atol=0)
        torch.testing.assert_close(s.mean_sq, (x * x).mean(0).float(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(s.mean_abs, x.abs().mean(0).float(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(s.samples, x[:KEEP].float(), rtol=0, atol=0)
    # q_proj reads the normed residual stream: checks the hook on the block input is the right tensor.
    blk = decoder_layers(model)[1]
    normed = blk.input_layernorm(direct["model.layers.1.residual"][:KEEP].float())
    torch.testing.assert_close(stats["model.layers.1.self_attn.q_proj"].samples, normed, rtol=1e-5, atol=1e-6)


def test_tiny_models_show_outlier_channels(tiny):
    """tiny_model scales 1/64 of the norm weights by 20: the q_proj inputs must show those channels as outliers."""
    arch, model, tok = tiny
    s = collect_stats(model, tok, TEXTS, n_tokens=128, seq_len=128, progress=False)["model.layers.0.self_attn.q_proj"]
    scaled = (decoder_layers(model)[0].input_layernorm.weight.abs() > 5).nonzero().flatten()
    top = atom_lab.reorder_index(s)[-scaled.numel():]
    assert set(top.tolist()) == set(scaled.tolist()), arch
    assert s.outlier_ratio() > 5


def test_decoder_discovery_and_keys():
    model, tok = atom_lab.tiny_model("llama", num_hidden_layers=3)
    assert decoder_layers_name(model) == "model.layers"
    assert decoder_layers(model) is model.model.layers
    assert atom_lab.linear_names(model)[:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    stats = collect_stats(model, tok, TEXTS, n_tokens=64, seq_len=32, residual=False, progress=False)
    assert sorted(stats) == sorted(atom_lab.linear_names(model)) and len(stats) == 21
    assert not any(k.endswith("residual") or "lm_head" in k for k in stats)
    assert stats["model.layers.2.mlp.down_proj"].channels == 640


def test_windows_cut_exactly():
    _, tok = atom_lab.tiny_model("llama")
    w = calibration_windows(tok, TEXTS, n_tokens=300, seq_len=128)
    assert [x.shape for x in w] == [torch.Size([1, 128]), torch.Size([1, 128]), torch.Size([1, 44])]


def test_half_precision_model_gives_float32_stats():
    model, tok = atom_lab.tiny_model("qwen2", dtype=torch.bfloat16)
    s = collect_stats(model, tok, TEXTS, n_tokens=64, seq_len=64, progress=False)["model.layers.0.mlp.down_proj"]
    assert s.mean_sq.dtype == torch.float32 and torch.isfinite(s.mean_sq).all() and s.samples.shape == (64, 640)


class _NoLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.LayerNorm(8) for _ in range(2)])


def test_model_without_linear_layers_is_a_clear_error():
    _, tok = atom_lab.tiny_model("llama")
    with pytest.raises(ValueError, match=r"no decoder blocks with nn\.Linear.*LlamaForCausalLM"):
        collect_stats(_NoLinear(), tok, TEXTS, progress=False)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        decoder_layers("llama")


@pytest.mark.parametrize("texts", [[], [""], ["   ", "\n"], ""])
def test_empty_text_is_a_clear_error(texts):
    model, tok = atom_lab.tiny_model("llama")
    with pytest.raises(ValueError, match="texts is empty.*load_corpus"):
        collect_stats(model, tok, texts, progress=False)


def test_bad_sizes_are_clear_errors():
    model, tok = atom_lab.tiny_model("llama")
    with pytest.raises(ValueError, match="fewer than one window of seq_len=512.*smaller seq_len"):
        collect_stats(model, tok, ["short text"], n_tokens=64, seq_len=512, progress=False)
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match="n_tokens must be a positive int"):
            collect_stats(model, tok, TEXTS, n_tokens=bad, progress=False)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        collect_stats(model, tok, TEXTS, seq_len=0, progress=False)
    with pytest.raises(ValueError, match="keep_tokens must be an int >= 0"):
        collect_stats(model, tok, TEXTS, keep_tokens=-1, progress=False)


def test_short_text_uses_what_there_is_with_a_warning():
    model, tok = atom_lab.tiny_model("llama")
    with pytest.warns(UserWarning, match="fewer than n_tokens=100000"):
        stats = collect_stats(model, tok, TEXTS, n_tokens=100_000, seq_len=256, progress=False)
    n = tok("\n\n".join(TEXTS), return_tensors="pt").input_ids.shape[1]
    assert stats["model.layers.0.residual"].n_tokens == n
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collect_stats(model, tok, TEXTS, n_tokens=n, seq_len=256, progress=False)
