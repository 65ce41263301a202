"""save_quantized / load_quantized: a reloaded model gives the same logits bit for bit, on both backends."""
import copy
import json

import pytest
import torch

import atom_lab
from atom_lab import AtomConfig, QuantLinear, load_quantized, quantize_model, save_quantized, set_backend
from atom_lab.serialize import META_FILE, TENSORS_FILE

DEV = atom_lab.default_device()
TEXTS = [f"Article {i}: the {w} of {v} was measured at {i * 7} units, then again in {1900 + i}." * 6
         for i, (w, v) in enumerate([("speed", "light"), ("mass", "iron"), ("heat", "water"), ("age", "rock")] * 5)]
CHEAP = dict(calibration=TEXTS, n_tokens=256, seq_len=128, progress=False)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _ids():
    return torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(7)).to(DEV)


@pytest.fixture(scope="module")
def tiny_atom():
    """Tiny qwen2 (q/k/v biases) with the full atom preset: GPTQ, clipping, INT8 keepers, INT4 KV cache."""
    model, tok = atom_lab.tiny_model("qwen2")
    return quantize_model(model, "atom", tokenizer=tok, **CHEAP), tok


def test_round_trip_is_bit_exact_on_both_backends(tiny_atom, tmp_path):
    q, tok = tiny_atom
    q = copy.deepcopy(q)
    info = save_quantized(q, tmp_path / "m", tokenizer=tok)
    ids = _ids()
    q2, tok2 = load_quantized(tmp_path / "m")
    assert q2.atom_config == q.atom_config and q2.atom_backend == "reference"
    assert tok2 is not None and tok2("abc").input_ids == tok("abc").input_ids
    a, b = q.state_dict(), q2.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
    assert torch.equal(_logits(q, ids), _logits(q2, ids))
    assert torch.equal(_logits(set_backend(q, "triton"), ids), _logits(set_backend(q2, "triton"), ids))
    # q/k/v's shared reorder index is stored once and shared again after loading
    attn = q2.model.layers[0].self_attn
    assert attn.q_proj.reorder is attn.k_proj.reorder is attn.v_proj.reorder or DEV.type == "cuda"
    assert info["aliases"] == 3 * 2  # per block: k and v alias q's index, up aliases gate's
    meta = json.loads((tmp_path / "m" / META_FILE).read_text())
    assert meta["format"] == "atom_lab.quantized" and meta["version"] == 1
    assert meta["model_config"]["model_type"] == "qwen2" and meta["atom_config"]["name"] == "atom"


def test_loads_on_the_requested_backend_and_keeps_the_saved_one(tiny_atom, tmp_path):
    q, _ = tiny_atom
    tri = set_backend(copy.deepcopy(q), "triton")
    save_quantized(tri, tmp_path / "t")
    q2, tok2 = load_quantized(tmp_path / "t")
    assert tok2 is None and q2.atom_backend == "triton" and q2.atom_fusions[0]
    q3, _ = load_quantized(tmp_path / "t", backend="reference")
    assert q3.atom_backend == "reference"
    assert torch.equal(_logits(q3, _ids()), _logits(q, _ids()))


@pytest.mark.parametrize("preset", ["w8a8", "w4a16", "w4a4-rtn"])
def test_unpacked_formats_round_trip(preset, tmp_path):
    """Integer levels + scales (+ zero points for w4a16) are what is stored; the float operand is rebuilt exactly."""
    model, tok = atom_lab.tiny_model("llama")
    q = quantize_model(model, preset, tokenizer=tok, **CHEAP)
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert all(torch.equal(m.dequantized_weight(), m.w_ref) for m in layers)
    save_quantized(q, tmp_path / preset)
    q2, _ = load_quantized(tmp_path / preset)
    assert torch.equal(_logits(q, _ids()), _logits(q2, _ids()))


def test_file_holds_the_packed_bytes(tiny_atom, tmp_path):
    q, _ = tiny_atom
    info = save_quantized(q, tmp_path / "m")
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert info["bytes_by_kind"]["quantized linear weights"] == sum(m.packed.nbytes() for m in layers)
    assert info["file_bytes"] - sum(info["bytes_by_kind"].values()) < 64 * 1024  # the rest: safetensors header
    float_model, _ = atom_lab.tiny_model("qwen2")
    float32 = sum(p.numel() * 4 for p in float_model.parameters())
    # INT4 + scales + 128 INT8 keepers is ~0.16-0.19 of float32 per linear; embeddings stay float32
    assert 0.15 < info["file_bytes"] / float32 < 0.3


def test_errors(tmp_path):
    model, tok = atom_lab.tiny_model("llama")
    with pytest.raises(ValueError, match="not quantized by atom_lab.quantize_model"):
        save_quantized(model, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="atom_lab.json"):
        load_quantized(tmp_path / "missing")
    q = quantize_model(model, "w4a4-rtn")
    save_quantized(q, tmp_path / "v")
    meta = json.loads((tmp_path / "v" / META_FILE).read_text())
    (tmp_path / "v" / META_FILE).write_text(json.dumps(meta | {"version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        load_quantized(tmp_path / "v")
    (tmp_path / "v" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="cannot run"):
        load_quantized(tmp_path / "v", backend="triton")
    (tmp_path / "v" / TENSORS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_quantized(tmp_path / "v")
    with pytest.raises(ValueError, match="keeper_bits=16"):
        save_quantized(quantize_model(atom_lab.tiny_model("llama")[0], AtomConfig.preset(
            "atom", gptq=False, keeper_bits=16), tokenizer=tok, **CHEAP), tmp_path / "k")
