"""`atom-lab serve` and `atom-lab serve-bench` (registered by atom_lab/cli.py)."""
from __future__ import annotations

import sys
import time


def _cmd_serve(args) -> int:
    import torch

    import atom_lab
    from atom_lab.kv_cache import KVFormat
    from atom_lab.serve.engine import Engine
    from atom_lab.serve.request import SamplingParams

    model, tok = atom_lab.load_model(args.model, dtype=torch.float32 if atom_lab.INTERPRET else torch.float16)
    preset = atom_lab.AtomConfig.preset(args.preset)
    kv_bits = args.kv_bits or (preset.kv_bits if preset.kv_bits < 16 else 16)
    if preset.quantizes and preset.w_bits < 16:
        calib = atom_lab.load_corpus("wiki")["calibration"]["text"]
        backend = "triton" if preset.packed(model.config.hidden_size) else "reference"
        model = atom_lab.quantize_model(model, preset.replace(kv_bits=16), calibration=calib, tokenizer=tok,
                                        backend=backend, n_tokens=args.calib_tokens, seq_len=256, progress=False)
    dtype = next(model.parameters()).dtype
    engine = Engine(model, KVFormat(bits=kv_bits, dtype=dtype), budget_bytes=args.budget_gb * 1e9,
                    page_size=16, max_num_seqs=args.max_batch, max_tokens_per_step=2048)
    mem = engine.runner.check_budget()
    print(f"{args.model} {args.preset} KV{kv_bits}: weights {mem['weights'] / 1e6:.1f} MB, KV pool "
          f"{mem['kv_pool'] / 1e6:.1f} MB ({engine.runner.pool.num_pages} pages), budget {args.budget_gb} GB")
    prompts = args.prompt or ["The capital of France is", "Quantization makes models"]
    ids = [tok(p)["input_ids"] for p in prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    outs = [[] for _ in prompts]
    t0 = time.perf_counter()
    for i, t, done in engine.stream(ids, params):
        outs[i].append(t)
        if done:
            print(f"[{i}] {prompts[i]!r} -> {tok.decode(outs[i])!r}", flush=True)
        elif args.progress:
            print(f"  step {engine.stats['steps']}: request {i} +1 token", end="\r", flush=True)
    wall = time.perf_counter() - t0
    n = sum(map(len, outs))
    print(f"{n} tokens in {wall:.2f} s: {n / wall:.1f} tokens/s ({engine.stats['steps']} steps, "
          f"{engine.scheduler.num_preemptions} preemptions)")
    return 0


def _cmd_serve_bench(args) -> int:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent.parent
    if not (root / "benchmarks" / "bench_serving.py").exists():
        print(f"atom-lab serve-bench runs from a source checkout ({root / 'benchmarks'} not found).", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    from benchmarks import bench_serving

    bench_serving.main(args.rest)
    return 0


def add_serve_commands(sub) -> None:
    import atom_lab

    p = sub.add_parser("serve", help="generate from prompts with the continuous-batching engine")
    p.add_argument("--model", default="smollm2-135m", choices=sorted(atom_lab.MODELS))
    p.add_argument("--preset", default="fp16", choices=list(atom_lab.PRESETS))
    p.add_argument("--kv-bits", type=int, choices=[16, 8, 4], default=None, help="default: the preset's")
    p.add_argument("--budget-gb", type=float, default=2.0, help="weights + KV pool + activations")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--progress", action="store_true")
    p.set_defaults(func=_cmd_serve)
    p = sub.add_parser("serve-bench", help="serving benchmark: measured tokens/s beside the simulator (needs a GPU)")
    p.add_argument("rest", nargs="*", help="arguments of benchmarks/bench_serving.py (after --)")
    p.set_defaults(func=_cmd_serve_bench)
