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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
