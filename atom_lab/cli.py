"""The `atom-lab` command. Each subcommand is a thin shell over a library function."""
from __future__ import annotations

import argparse
import json
import sys

import atom_lab  # noqa: F401  (chooses compiled Triton or the interpreter first)


def _cmd_env(args) -> int:
    for k, v in atom_lab.environment().items():
        print(f"{k:>14}: {v}")
    return 0


def _cmd_perplexity(args) -> int:
    import torch

    model, tok = atom_lab.load_model(args.model, dtype=getattr(torch, args.dtype))
    texts = atom_lab.load_corpus(args.corpus)[args.split]["text"]
    windows = atom_lab.eval_windows(tok, texts, args.seq_len, args.max_windows)
    ppl = atom_lab.perplexity(model, tok, texts, args.seq_len, args.max_windows)
    row = {"model": args.model, "corpus": f"{args.corpus}/{args.split}", "seq_len": args.seq_len,
           "windows": windows.shape[0], "tokens": windows.numel(), "ppl": ppl}
    print(f"{args.model} on {row['corpus']}: perplexity {ppl:.3f} "
          f"({row['windows']} windows x {args.seq_len} tokens = {row['tokens']} tokens)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
    return 0


def _cmd_bench(args) -> int:
    # The benchmark scripts live in benchmarks/ of a source checkout (they are not part of the installed package).
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "bench_gemm.py").exists():
        print(f"atom-lab bench runs from a source checkout: {root / 'benchmarks'} not found. Clone the repository "
              f"and run `python -m atom_lab.cli bench` from it.", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    from benchmarks import bench_gemm

    plot = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    bench_gemm.run(args.json, plot, args.markdown, args.quick)
    return 0


def _cmd_ablation(args) -> int:
    import copy
    import time

    import torch

    from atom_lab.config import ablation_configs, rotation_configs
    from atom_lab.metrics import evaluate
    from atom_lab.recipe import model_size_report, quantize_model

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    float_model, tok = atom_lab.load_model(args.model, dtype=torch.float32)
    corpus = atom_lab.load_corpus(args.corpus)
    windows = atom_lab.eval_windows(tok, corpus["test"]["text"], args.seq_len, args.max_windows)
    calib = corpus["calibration"]["text"]
    configs = (ablation_configs(group_size=args.group_size, keeper=args.keeper)
               + rotation_configs(group_size=args.group_size, keeper=args.keeper))
    if args.rows:
        wanted = [r.strip() for r in args.rows.split(",")]
        names = [c.name for c in configs]
        bad = [w for w in wanted if w not in names]
        if bad:
            raise SystemExit(f"--rows: unknown row(s) {bad}; rows are: {', '.join(names)}")
        configs = [c for c in configs if c.name in wanted or c.name == "fp16"]  # fp16 is the reference: free
    protocol = {"model": args.model, "corpus": f"{args.corpus}/test", "seq_len": args.seq_len,
                "windows": windows.shape[0], "tokens": windows.numel(),
                "predicted_tokens": windows.shape[0] * (args.seq_len - 1),
                "calibration": f"{args.corpus}/calibration, {args.calib_tokens} tokens in windows of "
                               f"{args.calib_seq_len}", "backend": "reference (fake quantization in float32)",
                "float": "the GGUF Q4_1 weights dequantized to float32 (the 'fp16' row: no quantization)"}
    print("Atom ablation on", protocol["corpus"])
    for k, v in protocol.items():
        print(f"  {k:>16}: {v}")
    models, info = {}, {}
    for c in configs:
        t0 = time.time()
        # quantize_model works in place: every row starts from a fresh copy of the float model
        m = float_model if not c.quantizes else quantize_model(
            copy.deepcopy(float_model), c, calibration=calib, tokenizer=tok, n_tokens=args.calib_tokens,
            seq_len=args.calib_seq_len, progress=not args.no_progress)
        size = model_size_report(m)
        n_weights = size["fp16_bytes"] // 2
        info[c.name] = {"quantize_s": round(time.time() - t0, 1), "linear_bytes": size["stored_bytes"],
                        "bits_per_weight": round(8 * size["stored_bytes"] / n_weights, 4),
                        "config": c.to_dict()}
        models[c.name] = m
        print(f"  quantized {c.name!r} in {info[c.name]['quantize_s']} s", flush=True)
    t0 = time.time()
    results = evaluate(models, windows, reference=float_model, progress=not args.no_progress)
    print(f"  evaluated {len(models)} models in {time.time() - t0:.0f} s\n")
    base = results["fp16"]["ppl"]
    print(f"{'row':<28}{'ppl':>10}{'x float':>9}{'KL':>9}{'top-1':>8}{'bits/w':>8}")
    rows = []
    for c in configs:
        r = results[c.name]
        ratio = r["ppl"] / base
        print(f"{c.name:<28}{r['ppl']:>10.3f}{ratio:>9.3f}{r['kl']:>9.4f}"
              f"{r['top1']:>8.3f}{info[c.name]['bits_per_weight']:>8.3f}")
        rows.append({"name": c.name, "ppl": r["ppl"], "kl": r["kl"], "top1": r["top1"], "ppl_ratio": ratio,
                     "nll": r["nll"], **info[c.name]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"protocol": protocol, "environment": atom_lab.environment(), "rows": rows}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


def _cmd_quantize(args) -> int:
    import time

    import torch

    model, tok = atom_lab.load_model(args.model, dtype=torch.float32)
    calib = atom_lab.load_corpus(args.corpus)["calibration"]["text"]
    t0 = time.time()
    atom_lab.quantize_model(model, args.preset, calibration=calib, tokenizer=tok, n_tokens=args.calib_tokens,
                            seq_len=args.calib_seq_len, progress=not args.no_progress)
    seconds = time.time() - t0
    info = atom_lab.save_quantized(model, args.out, tokenizer=tok)
    print(f"quantized {args.model} with preset {args.preset!r} in {seconds:.0f} s ({args.calib_tokens} calibration "
          f"tokens); wrote {info['path']}: model.safetensors {info['file_bytes'] / 2**20:.1f} MiB")
    for kind, nbytes in sorted(info["bytes_by_kind"].items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<32}{nbytes / 2**20:>9.2f} MiB")
    return 0


def _cmd_backends(args) -> int:
    import copy
    import time

    from atom_lab.metrics import evaluate

    ref, tok = atom_lab.load_quantized(args.quantized, backend="reference")
    if tok is None:
        raise SystemExit(f"{args.quantized} holds no tokenizer; save it with save_quantized(..., tokenizer=tok).")
    tri = atom_lab.set_backend(copy.deepcopy(ref), "triton")
    windows = atom_lab.eval_windows(tok, atom_lab.load_corpus(args.corpus)["test"]["text"], args.seq_len,
                                    args.max_windows)
    t0 = time.time()
    r = evaluate({"reference": ref, "triton": tri}, windows, reference=ref, progress=not args.no_progress)
    row = {"quantized": str(args.quantized), "corpus": f"{args.corpus}/test", "seq_len": args.seq_len,
           "windows": windows.shape[0], "predicted_tokens": windows.shape[0] * (args.seq_len - 1),
           "ppl_reference": r["reference"]["ppl"], "ppl_triton": r["triton"]["ppl"],
           "ppl_rel_diff": r["triton"]["ppl"] / r["reference"]["ppl"] - 1, "kl_triton_vs_reference": r["triton"]["kl"],
           "top1_triton_vs_reference": r["triton"]["top1"], "seconds": round(time.time() - t0, 1),
           "kernels": atom_lab.environment()["kernels"]}
    print(f"perplexity on {row['windows']} windows x {args.seq_len} tokens: reference {row['ppl_reference']:.3f}, "
          f"triton {row['ppl_triton']:.3f} ({100 * row['ppl_rel_diff']:+.2f}%); triton vs reference: KL "
          f"{row['kl_triton_vs_reference']:.4f}, top-1 {row['top1_triton_vs_reference']:.3f}; {row['seconds']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atom-lab", description="Atom W4A4 quantization: lab tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("env", help="versions, device, and whether kernels are compiled or interpreted")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser("perplexity", help="float perplexity of a packaged model on a packaged corpus")
    p.add_argument("--model", default="smollm2-135m", choices=sorted(atom_lab.MODELS))
    p.add_argument("--corpus", default="wiki", choices=sorted(atom_lab.CORPORA))
    p.add_argument("--split", default="test", choices=["calibration", "test"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--json", help="also write the result to this JSON file")
    p.set_defaults(func=_cmd_perplexity)

    p = sub.add_parser("bench", help="time the W4A4 kernels against cuBLAS bf16 / INT8 / FP8 (needs a CUDA GPU)")
    p.add_argument("--json", help="write device, versions, every shape and every time to this JSON file")
    p.add_argument("--plot", help="PNG of the speed-ups (default: the --json path with .png)")
    p.add_argument("--markdown", help="write the README-ready table to this file")
    p.add_argument("--quick", action="store_true", help="fewer M values")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("ablation", help="Atom's ablation table (ppl, KL, top-1 per technique) on the wiki test split")
    p.add_argument("--model", default="smollm2-135m", choices=sorted(atom_lab.MODELS))
    p.add_argument("--corpus", default="wiki", choices=sorted(atom_lab.CORPORA))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate the first N windows (default: all)")
    p.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens (default 32 x 512)")
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=64, help="group size of the group/atom rows (default 64)")
    p.add_argument("--keeper", type=int, default=128, help="INT8 outlier channels (default 128)")
    p.add_argument("--rows", help="comma-separated subset of row names (default: all rows)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is often faster on a CPU shared with other jobs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", help="write the rows and the protocol to this JSON file")
    p.set_defaults(func=_cmd_ablation)

    p = sub.add_parser("quantize", help="quantize a packaged model and save it (save_quantized: safetensors + JSON)")
    p.add_argument("--model", default="smollm2-135m", choices=sorted(atom_lab.MODELS))
    p.add_argument("--preset", default="atom", choices=list(atom_lab.PRESETS))
    p.add_argument("--corpus", default="wiki", choices=sorted(atom_lab.CORPORA))
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="directory to write")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("backends", help="perplexity of a saved quantized model on the reference and triton backends")
    p.add_argument("quantized", help="a directory written by `atom-lab quantize` / save_quantized")
    p.add_argument("--corpus", default="wiki", choices=sorted(atom_lab.CORPORA))
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (short on a CPU: interpreter)")
    p.add_argument("--max-windows", type=int, default=4)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", help="write the result to this JSON file")
    p.set_defaults(func=_cmd_backends)

    from atom_lab.serve.commands import add_serve_commands
    add_serve_commands(sub)  # serve, serve-bench
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
