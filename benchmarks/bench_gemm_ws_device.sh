#!/bin/bash
# One device call for kernels/gemm_gluon_ws.py (fifth session): a smoke check (one configuration, one shape, against
# the twin and the reference; stops the call early if the kernel hangs or is wrong), the GPU tests, then the
# benchmark on Llama-2-7B/13B shapes, every column in the same run as cuBLAS bf16 (CUDA graphs, L2 flushed).
# Usage: OUT=dir bash benchmarks/bench_gemm_ws_device.sh [tag]
TAG=${1:-}
cd "$(dirname "$0")/.."
python - <<'PY' 2>&1 | tee "$OUT/gemm_h200_ws${TAG}_smoke.txt"
import sys, time, torch, triton
sys.path.insert(0, "tests")
from test_gemm import packed_pair, assert_matches
from atom_lab.kernels import gemm_gluon_ws as W, gemm_int4
print("triton", triton.__version__, torch.__version__, torch.cuda.get_device_name(), "gluon_ws", W.AVAILABLE, W.IMPORT_ERROR)
a, w = packed_pair(128, 1024, 3968, 128, 128, seed=1)
for cfg in (W.CONFIGS[0], W.CONFIGS[1]):
    t = time.time()
    y = torch.full((128, 1024), float("nan"), device="cuda")
    W.launch(a, w, y, None, *cfg)
    torch.cuda.synchronize()
    tw = torch.full_like(y, float("nan"))
    gemm_int4._launch_fused8(w, a, tw, None, 64, 64, cfg[3], 4, 4)
    d = (y - tw).abs()
    print(cfg, f"{time.time() - t:.1f} s", "bitwise" if torch.equal(y, tw) else f"differs: max {d.max().item():.3e}, {int((d > 0).sum())} elements")
    assert_matches(y, a, w)
print("SMOKE OK")
PY
grep -q "SMOKE OK" "$OUT/gemm_h200_ws${TAG}_smoke.txt" || { echo "smoke failed: stopping"; exit 1; }
timeout ${PYTEST_S:-110} python -m pytest -q -x tests/test_gemm_gluon_ws.py 2>&1 | tail -25 | tee "$OUT/gemm_h200_ws${TAG}_pytest.txt"
timeout ${BENCH_S:-230} python benchmarks/bench_gemm.py --lean --ms ${MS:-16,64,128,256,1024} --models 7B,13B --gluon-ms 0 \
    --ws-ms ${WS_MS:-16,64,128,256,1024} --no-quant --rep ${REP:-20} --json "$OUT/gemm_h200_ws${TAG}.json" \
    --markdown "$OUT/gemm_h200_ws${TAG}.md" 2>&1 | tee "$OUT/gemm_h200_ws${TAG}.log"
ls "$OUT"
