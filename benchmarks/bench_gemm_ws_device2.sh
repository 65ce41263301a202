#!/bin/bash
# Second device call for kernels/gemm_gluon_ws.py: the GPU tests, one process per configuration in parallel (a crash
# in one, e.g. an illegal instruction, cannot poison the others, and names its configuration), then the benchmark
# at M = 64-256 on Llama-2-7B/13B shapes (same run as cuBLAS bf16, CUDA graphs, L2 flushed).
cd "$(dirname "$0")/.."
T=$OUT/gemm_h200_ws2_pytest.txt
n=$(python -c "from atom_lab.kernels import gemm_gluon_ws as W; print(len(W.CONFIGS))")
for i in $(seq 0 $((n - 1))); do
  (timeout 120 python -m pytest -q -x tests/test_gemm_gluon_ws.py -k "every_config and $(python -c "from atom_lab.kernels import gemm_gluon_ws as W; print('ncons{}-BY{}-S{}-split{}-ov{}'.format(*map(int, W.CONFIGS[$i])))")" > /tmp/ws_cfg$i.txt 2>&1) &
done
(timeout 120 python -m pytest -q tests/test_gemm_gluon_ws.py -k "not every_config" > /tmp/ws_rest.txt 2>&1) &
wait
for f in /tmp/ws_cfg*.txt /tmp/ws_rest.txt; do echo "== $f"; grep -E "passed|failed|^case|Error|assert" $f | tail -6; done | tee $T
timeout ${BENCH_S:-150} python benchmarks/bench_gemm.py --lean --ms 64,128,256 --models 7B,13B --gluon-ms 0 \
    --ws-ms 64,128,256 --no-quant --rep 20 --json "$OUT/gemm_h200_ws2.json" --markdown "$OUT/gemm_h200_ws2.md" 2>&1 \
    | tee "$OUT/gemm_h200_ws2.log" | grep -v "^|"
