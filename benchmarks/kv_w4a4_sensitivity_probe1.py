"""W4A4 (atom preset, RTN, kv_bits=16) perplexity on 2 x 512 wiki test tokens under tiny perturbations of K/V (probe 1 of 0-2;
results: benchmarks/results/kv_w4a4_sensitivity_probe1.log). Run: OMP_NUM_THREADS=1 python benchmarks/kv_w4a4_sensitivity_probe1.py"""
import atom_lab, torch, math, time
from atom_lab.eval import eval_windows, window_nll
model, tok = atom_lab.load_model("smollm2-135m", dtype=torch.float32)
corpus = atom_lab.load_corpus("wiki")
windows = eval_windows(tok, corpus["test"]["text"], 512, 2)
n = windows.shape[0]*(windows.shape[1]-1)
ppl = lambda m: math.exp(window_nll(m, windows, progress=False).sum().item()/n)
cfg = atom_lab.AtomConfig.preset("atom", gptq=False, kv_bits=16, name="x")
q = atom_lab.quantize_model(model, cfg, calibration=corpus["calibration"]["text"], tokenizer=tok, progress=False, n_tokens=2048)
stats = {}
def rec(name):
    def f(m, i, o):
        stats.setdefault(name, []).append((float(o.abs().max()), bool(torch.isfinite(o.half()).all())))
    return f
hs = []
for li, l in enumerate(q.model.layers):
    hs.append(l.self_attn.k_proj.register_forward_hook(rec(f"k{li}")))
    hs.append(l.self_attn.v_proj.register_forward_hook(rec(f"v{li}")))
print("plain", ppl(q))
for h in hs: h.remove()
print({k: max(a for a, b in v) for k, v in stats.items() if max(a for a, b in v) > 1000})
print("nonfinite in fp16:", [k for k, v in stats.items() if not all(b for a, b in v)])
for which in ("k", "v"):
    hs = [getattr(l.self_attn, f"{which}_proj").register_forward_hook(lambda m, i, o: o.half().float()) for l in q.model.layers]
    print("round only", which, ppl(q))
    for h in hs: h.remove()
# the o_proj input: does rounding change INT4 activation codes a lot?
hs = [l.self_attn.o_proj.register_forward_pre_hook(lambda m, a: (a[0].half().float(),)) for l in q.model.layers]
print("round o_proj input", ppl(q))
for h in hs: h.remove()
hs = [l.self_attn.q_proj.register_forward_hook(lambda m, i, o: o.half().float()) for l in q.model.layers]
print("round q", ppl(q))
for h in hs: h.remove()
hs = [l.self_attn.k_proj.register_forward_hook(lambda m, i, o: o * (1 + 1e-3 * torch.randn_like(o))) for l in q.model.layers]
print("k times (1 + 1e-3 noise)", ppl(q))
for h in hs: h.remove()
