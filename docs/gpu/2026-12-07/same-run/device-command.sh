#!/usr/bin/env bash
# Mamba-2 GPU call: the equivalence verdicts with this commit's code, then the same-run bench of the
# port and mamba_ssm, bf16, 2.7b first, then 130m, with a decode profile of the port
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
O=$OUT/r; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv > $O/gpu.txt
step() { local t=$1; shift; local name=$1; shift; echo "== $name $(date +%T)"; timeout $t "$@" > $O/$name.log 2>&1; echo "   rc=$? $(date +%T)"; grep -v -i -E "warn|^W1|^I1" $O/$name.log | grep -E "${PAT:-.}" | tail -${TAILN:-8}; }
PAT="EQUIVALENT|DIVERGENT|fixture|Error" TAILN=30 step 215 verdicts python3 -m equiv_reference.mamba2.gpu_run --out $O/verdicts --sections model
PAT="tok/s|ms/token|GPU kernels|FAILED|ceilings" TAILN=30 step 345 bench python3 -m equiv_reference.mamba2.gpu_bench --out $O/bench --models 2.7b,130m --dtypes bfloat16 --impls port,mamba_ssm --prefill-lens 2048 --sweep-lens 65536 --decode-positions 16,8192 --repeats 3 --profile decode
cd $OUT && tar czf c3.tgz r && rm -rf r
# second call, the same warm machine, right after (fp32 table):
#   pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:. XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 300 python3 -m equiv_reference.mamba2.gpu_bench \
#       --out bench-fp32 --models 130m,2.7b --dtypes float32 --impls port,mamba_ssm --prefill-lens 2048 --sweep-lens= \
#       --decode-positions 16 --repeats 3
