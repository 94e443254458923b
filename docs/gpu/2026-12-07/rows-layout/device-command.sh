#!/usr/bin/env bash
# Mamba-2 GPU call: verdicts with the rows weight layout, then the same-run bench (2.7b with mamba_ssm,
# then the layout comparison at decode)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
O=$OUT/r; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv > $O/gpu.txt
step() { local t=$1; shift; local name=$1; shift; echo "== $name $(date +%T)"; timeout $t "$@" > $O/$name.log 2>&1; echo "   rc=$? $(date +%T)"; grep -v -i -E "warn|^W1|^I1" $O/$name.log | tail -${TAILN:-8}; }
TAILN=6 step 125 verdicts python3 -m equiv_reference.mamba2.gpu_run --out $O/verdicts --sections model
TAILN=20 step 250 bench27 python3 -m equiv_reference.mamba2.gpu_bench --out $O/bench27 --models 2.7b --dtypes bfloat16 --impls port,mamba_ssm --prefill-lens 2048 --sweep-lens 65536 --decode-positions 16,8192 --repeats 3 --weight-layouts rows,columns
cd $OUT && tar czf m2.tgz r && rm -rf r
