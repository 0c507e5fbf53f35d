#!/usr/bin/env bash
# The GPU measurements of benchmarks/README.md ("On a GPU"), as one script sized for a short
# accelerator session (about 9 minutes). Run from the repository root on a CUDA machine with
# jax[cuda], torch (CUDA build) and transformers installed; results and logs go to $OUT
# (default benchmarks/results/gpu). Each stage has its own time limit, so a slow or failing
# stage leaves the others' results.
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh                  # every stage
#   bash benchmarks/gpu_session.sh speed_b8_s256 attention         # only these stages
# fp32 stages run JAX at matmul precision "highest" (no TF32), like torch's fp32 default, so the
# frameworks do the same arithmetic; the attention stage adds bf16 rows (blocked vs cuDNN).
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 JAX_DEFAULT_MATMUL_PRECISION=highest
PY=${PYTHON:-python3}
STAGES=" ${*:-speed_b8_s256 attention speed_b2_s1024 speed_b1_s4096} "
stage() {  # stage NAME SECONDS ARGS...: one bench_methods.py run, its JSON and log in $OUT
    local name=$1 limit=$2; shift 2
    [[ $STAGES == *" $name "* ]] || return 0
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$PY" benchmarks/bench_methods.py --out "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log" | tail -40
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import jax, torch, transformers; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.is_available(), '| transformers', transformers.__version__)"
stage speed_b8_s256 170 --sections peak,speed --methods all
stage attention 90 --sections attention
stage speed_b2_s1024 160 --sections speed --methods all --seq 1024 --batch 2
stage speed_b1_s4096 90 --sections speed --methods standard,method1,method2,method5.2 --seq 4096 --batch 1 --rounds 2
