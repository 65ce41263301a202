"""How many kernels one decode step of the engine launches, per weight format, counted on the CPU: every torch op
that computes (a TorchDispatchMode; views and allocations not counted) and every Triton launch, over one static
decode step of bench_serving's tiny Llama (2 layers). On the CPU the decode attention of the float formats runs its
PyTorch reference and the interpreter adds copies and finiteness checks of its own, so compare formats that share
a path: W8A8 vs FP16 differ only in their linears (serve/lowbit.py's per-token FP8 quantizer is unfused torch ops).

    python -m benchmarks.serve_kernel_count
"""
from __future__ import annotations

import atom_lab  # noqa: F401  (sets TRITON_INTERPRET on a CPU before triton loads)

import triton.runtime.interpreter as interp
from torch.utils._python_dispatch import TorchDispatchMode

import benchmarks.bench_serving as bench
from atom_lab.serve.request import SamplingParams

NOT_KERNELS = {"view", "_unsafe_view", "reshape", "t", "transpose", "expand", "as_strided", "detach", "alias",
               "slice", "select", "unsqueeze", "squeeze", "permute", "lift_fresh", "empty", "empty_like",
               "empty_strided", "_reshape_alias", "split", "split_with_sizes", "unbind", "narrow", "view_as",
               "item", "_local_scalar_dense", "set_", "resize_", "new_empty", "new_empty_strided"}


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NOT_KERNELS:
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def count(weights: str, kv_bits: int) -> dict:
    launches: dict[str, int] = {}
    run = interp.InterpretedFunction.run

    def counted(self, *a, **k):
        name = getattr(getattr(self, "fn", None), "__name__", "kernel")
        launches[name] = launches.get(name, 0) + 1
        return run(self, *a, **k)

    model = bench.build_model(weights, bench.TINY, cuda=False)
    eng = bench.make_engine(model, kv_bits, 2, num_pages=40)
    for prompt in ([1, 2, 3, 4, 5], [6, 7, 8]):
        eng.add_request(prompt, SamplingParams(max_new_tokens=3, ignore_eos=True))
    eng.step()  # prefill
    interp.InterpretedFunction.run = counted
    try:
        with OpCount() as ops:
            eng.step()  # one decode step, static path
    finally:
        interp.InterpretedFunction.run = run
    layers = bench.TINY["num_hidden_layers"]
    total = sum(ops.ops.values()) + sum(launches.values())
    return {"format": f"{weights}-kv{kv_bits}", "kernels_per_step": total, "per_layer": total / layers,
            "torch_ops": ops.ops, "triton_launches": launches}


def main() -> list[dict]:
    bench.KV_ROPE = "post"
    rows = [count(w, kv) for w, kv in (("fp16", 16), ("w8a8", 16), ("w4a16", 16), ("w4a4", 4))]
    for r in rows:
        print(f"{r['format']:>10}: {r['kernels_per_step']:4d} kernels per decode step ({r['per_layer']:.1f} per layer)")
    fp16, w8a8 = rows[0], rows[1]
    print(f"W8A8 - FP16: {(w8a8['kernels_per_step'] - fp16['kernels_per_step']) / bench.TINY['num_hidden_layers']:.0f}"
          " more kernels per layer (same attention path, so all of it is in the linears)")
    return rows


if __name__ == "__main__":
    main()
