#!/usr/bin/env bash
# Decode A/B on one GPU, bf16, 130m and 2.7b, a 16-token prompt then 64 tokens, medians of 5:
#   base   = commit 5cc6760: the loop with a lax.cond skipping the last step, caches stacked (.ab/base)
#   nocond = the shared greedy_loop (no lax.cond), caches stacked (.ab/v2): the code committed after
#   new    = greedy_loop, decode_step writing caches in place on GPU (tried, slower, not kept), profiled
#   cmdbuf = new (in place) under XLA command buffers for while loops and conditionals
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
R=$PWD; O=$OUT/r; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv > $O/gpu.txt
step() { local t=$1; shift; local name=$1; shift; echo "== $name $(date +%T)"; timeout $t "$@" > $O/$name.log 2>&1; echo "   rc=$? $(date +%T)"; grep -v -i -E "warn|^W1|^I1" $O/$name.log | grep -E "decode|GPU kernels|FAILED|Error" | tail -${TAILN:-8}; }
B="-m equiv_reference.mamba2.gpu_bench --impls port --models 130m,2.7b --dtypes bfloat16 --prefill-lens= --sweep-lens= --decode-positions 16 --repeats 5 --no-ceilings"
cd $R/.ab/base && PYTHONPATH=/tmp/site step 110 dec-base python3 $B --out $O/dec-base
cd $R/.ab/v2 && PYTHONPATH=/tmp/site step 110 dec-nocond-stack python3 $B --out $O/dec-nocond-stack
cd $R && PYTHONPATH=/tmp/site:. TAILN=30 step 150 dec-new python3 $B --out $O/dec-new --profile decode
cd $R && PYTHONPATH=/tmp/site:. XLA_FLAGS=--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL step 110 dec-cmdbuf python3 $B --out $O/dec-cmdbuf
cd $OUT && tar czf dec.tgz r && rm -rf r
