"""W4A4 (atom preset, RTN, kv_bits=16) perplexity on 2 x 512 wiki test tokens: plain forward vs simulate_kv float16 / float32 (probe 0;
results: benchmarks/results/kv_w4a4_sensitivity_probe0.log). Run: OMP_NUM_THREADS=1 python benchmarks/kv_w4a4_sensitivity_probe0.py"""
import atom_lab, torch, math, time
from atom_lab.eval import eval_windows, window_nll
from atom_lab.kv_cache import KVFormat, PagePool
from atom_lab.paged_model import PagedDecoder, simulate_kv
t0=time.time()
model, tok = atom_lab.load_model("smollm2-135m", dtype=torch.float32)
corpus = atom_lab.load_corpus("wiki")
windows = eval_windows(tok, corpus["test"]["text"], 512, 2)
n = windows.shape[0]*(windows.shape[1]-1)
ppl = lambda m: math.exp(window_nll(m, windows, progress=False).sum().item()/n)
t=time.time(); print("float plain", ppl(model), time.time()-t, flush=True)
cfg = atom_lab.AtomConfig.preset("atom", gptq=False, kv_bits=16, name="x")
q = atom_lab.quantize_model(model, cfg, calibration=corpus["calibration"]["text"], tokenizer=tok, progress=False, n_tokens=2048)
print("quantized", time.time()-t0, flush=True)
print("w4a4 plain", ppl(q), flush=True)
with simulate_kv(q, KVFormat(bits=16, dtype=torch.float16)):
    print("w4a4 sim fp16", ppl(q), flush=True)
with simulate_kv(q, KVFormat(bits=16, dtype=torch.float32)):
    print("w4a4 sim fp32 (hooks, identity)", ppl(q), flush=True)
print("w4a4 plain again", ppl(q), flush=True)
print(q.config._attn_implementation, type(q.model.layers[0].self_attn.k_proj), q.model.layers[0].self_attn.k_proj.out_bits)
print(type(q.model.layers[0].input_layernorm))
