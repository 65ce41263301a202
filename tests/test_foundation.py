"""The foundation: offline model and corpus, tiny models, perplexity, the CPU/GPU switch."""
import os
import subprocess
import sys

import pytest
import torch

import atom_lab


def test_interpreter_is_on_without_cuda():
    if not torch.cuda.is_available():
        assert atom_lab.INTERPRET and os.environ["TRITON_INTERPRET"] == "1"
    env = atom_lab.environment()
    assert {"torch", "triton", "transformers", "device", "kernels"} <= env.keys()


def _run(code: str, **env):
    full = dict(os.environ)
    full.pop("TRITON_INTERPRET", None)
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the guard is for machines without CUDA")
def test_compiled_triton_imported_first_is_a_clear_error():
    r = _run("import triton\nimport atom_lab")
    assert r.returncode != 0
    assert "import atom_lab" in r.stderr and "TRITON_INTERPRET=1" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the switch is for machines without CUDA")
def test_import_sets_interpreter_before_triton():
    # atom_lab imports triton itself (the quantized layers use the kernels), so the switch is proven by what
    # triton built: @triton.jit only returns an interpreted kernel when TRITON_INTERPRET=1 was set before.
    r = _run("import atom_lab, os\nfrom atom_lab.kernels import pack\n"
             "print(os.environ['TRITON_INTERPRET'], type(pack._pack_int4_kernel).__name__)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "InterpretedFunction"]


def test_unknown_model_name_lists_available():
    with pytest.raises(ValueError, match="smollm2-135m"):
        atom_lab.load_model("llama-7b")


def test_unknown_corpus_and_tiny_arch_rejected():
    with pytest.raises(ValueError, match="wiki"):
        atom_lab.load_corpus("wikitext2")
    with pytest.raises(ValueError, match="llama"):
        atom_lab.tiny_model("gpt5")


def test_load_model_offline_without_cache(tmp_path, smollm2_package):
    """Fresh cache, hub forbidden: the GGUF is converted locally, then the cached copy reloads the same weights."""
    code = (
        "import atom_lab, torch\n"
        "m, tok = atom_lab.load_model('smollm2-135m')\n"
        "print(m.config.num_hidden_layers, m.config.hidden_size, len(tok))\n"
        "print(float(m.model.layers[3].mlp.down_proj.weight.double().sum()))\n"
    )
    env = dict(ATOM_LAB_CACHE=str(tmp_path), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    first = _run(code, **env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "smollm2-135m-float32" / "model.safetensors").exists()
    assert not (tmp_path / "hf" / "hub").exists(), "something tried the Hugging Face hub cache"
    second = _run(code, **env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert first.stdout == second.stdout
    assert first.stdout.split()[:3] == ["30", "576", "49152"]


def test_smollm2_generates_text(smollm2):
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt").input_ids.to(model.device)
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:])
    assert "Paris" in text


def test_corpus_splits_disjoint_and_deterministic(corpus):
    cal, test = corpus["calibration"], corpus["test"]
    assert len(cal) + len(test) == 10033
    assert 900 <= len(test) <= 1100
    assert not set(cal["title"]) & set(test["title"])
    again = atom_lab.load_corpus("wiki")
    assert again["test"]["title"][:20] == test["title"][:20]
    assert all(t.strip() for t in test["text"][:100])
    with pytest.raises(ValueError, match="test_fraction"):
        atom_lab.load_corpus("wiki", test_fraction=1.5)


@pytest.mark.parametrize("arch", sorted(atom_lab.TINY_ARCHS))
def test_tiny_models_build_and_run(arch):
    m1, tok = atom_lab.tiny_model(arch, seed=0)
    m2, _ = atom_lab.tiny_model(arch, seed=0)
    m3, _ = atom_lab.tiny_model(arch, seed=1)
    assert m1.config.model_type == arch
    assert 128 <= m1.config.hidden_size <= 256
    ids = tok("tiny models, real architectures", return_tensors="pt").input_ids.to(m1.device)
    logits = m1(ids).logits
    assert logits.shape == (1, ids.shape[1], m1.config.vocab_size)
    assert torch.equal(logits, m2(ids).logits)
    assert not torch.equal(logits, m3(ids).logits)


def test_perplexity_matches_direct_computation():
    """Two windows by hand: exp of the mean NLL over both windows' predicted tokens."""
    model, tok = atom_lab.tiny_model("llama", seed=0)
    texts = ["abcdefgh" * 10, "the quick brown fox " * 5]
    ppl = atom_lab.perplexity(model, tok, texts, seq_len=32, max_windows=2, progress=False)
    ids = tok("\n\n".join(texts), return_tensors="pt").input_ids[0][:64].view(2, 32).to(model.device)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert ppl == pytest.approx(torch.exp(nll).item(), rel=1e-5)


def test_perplexity_rejects_bad_input():
    model, tok = atom_lab.tiny_model("llama")
    with pytest.raises(ValueError, match="texts is empty"):
        atom_lab.perplexity(model, tok, [], seq_len=16)
    with pytest.raises(ValueError, match="fewer than one window"):
        atom_lab.perplexity(model, tok, ["short"], seq_len=64)
    with pytest.raises(ValueError, match="seq_len"):
        atom_lab.perplexity(model, tok, ["some text"], seq_len=1)


def test_smollm2_perplexity_plausible(smollm2, corpus):
    model, tok = smollm2
    ppl = atom_lab.perplexity(model, tok, corpus["test"]["text"], seq_len=512, max_windows=4, progress=False)
    assert 5.0 < ppl < 40.0


def test_repo_root_kernels_folder_does_not_shadow(tmp_path):
    """From the repository root, kernels/ is importable as a top-level `kernels`, the name of a PyPI package that
    transformers probes by importing it; that must stay harmless (no triton import before atom_lab chooses)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import transformers\nfrom transformers import LlamaForCausalLM\nprint('ok')"
    full = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, env=full, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
