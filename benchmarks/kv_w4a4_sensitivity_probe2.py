"""W4A4 (atom preset, RTN, kv_bits=16) perplexity on 2 x 512 wiki test tokens under tiny perturbations of K/V (probe 2 of 0-2;
results: benchmarks/results/kv_w4a4_sensitivity_probe2.log). Run: OMP_NUM_THREADS=1 python benchmarks/kv_w4a4_sensitivity_probe2.py"""
import atom_lab, torch, math, time
from atom_lab.eval import eval_windows, window_nll
model, tok = atom_lab.load_model("smollm2-135m", dtype=torch.float32)
corpus = atom_lab.load_corpus("wiki")
windows = eval_windows(tok, corpus["test"]["text"], 512, 2)
n = windows.shape[0]*(windows.shape[1]-1)
ppl = lambda m: math.exp(window_nll(m, windows, progress=False).sum().item()/n)
cfg = atom_lab.AtomConfig.preset("atom", gptq=False, kv_bits=16, name="x")
q = atom_lab.quantize_model(model, cfg, calibration=corpus["calibration"]["text"], tokenizer=tok, progress=False, n_tokens=2048)
def with_hooks(fn, which="k_proj"):
    hs = [getattr(l.self_attn, which).register_forward_hook(fn) for l in q.model.layers]
    r = ppl(q)
    for h in hs: h.remove()
    return r
print("plain", ppl(q), flush=True)
print("k clone", with_hooks(lambda m, i, o: o.clone()), flush=True)
print("k noise 1e-6", with_hooks(lambda m, i, o: o * (1 + 1e-6 * torch.randn_like(o))), flush=True)
print("k contiguous transpose copy", with_hooks(lambda m, i, o: o.transpose(0, 1).contiguous().transpose(0, 1)), flush=True)
print("attn impl", q.config._attn_implementation)
q.config._attn_implementation = "eager"
print("plain eager", ppl(q), flush=True)
