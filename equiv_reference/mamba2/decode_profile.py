"""Where a decode step's time goes: the port's on-device decode loop under jax.profiler, its ops
grouped by kind, per step.

    python -m equiv_reference.mamba2.decode_profile --model 130m --dtype float32    # the CPU bench's shape

The model is gpu_bench's (random weights, the layout the port loads on this backend). It times the
loop untraced first (the figure to compare with the bench), then traces the same loop: counts per
step are exact, times under the tracer are inflated (the 130m float32 step on a 2-core CPU: 24.1
against 22.4 ms untraced; and summed over threads, so dots split across cores count twice), so read
them as shares. Ops are grouped by the name XLA gives them with the numeric suffix cut
(`dot.1372` -> `dot`, `loop_concatenate_fusion_1` -> `loop_concatenate_fusion`).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from equiv_reference.mamba2.gpu_bench import SHAPES, device_ops, port_config, port_params


def op_kind(name: str) -> str:
    return re.sub(r"[._]\d+$", "", name.split(" ")[0])


def ops_per_step(trace_dir: Path, steps: int) -> list[dict]:
    """(kind, count per step, traced us per step), largest first, of the ops the device ran
    (gpu_bench.device_ops says which events those are)."""
    us, count = Counter(), Counter()
    for name, dur in device_ops(trace_dir) or []:
        us[op_kind(name)] += dur
        count[op_kind(name)] += 1
    return [{"op": k, "per_step": round(count[k] / steps, 1), "traced_us_per_step": round(v / steps, 1)}
            for k, v in us.most_common()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="130m", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=17, help="tokens generated (steps = tokens - 1)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    if args.tokens < 2 or args.repeats < 1:
        ap.error(f"--tokens: expected >= 2 and --repeats >= 1, got {args.tokens} and {args.repeats}")
    import jax
    import jax.numpy as jnp

    from equiv.mamba2.generate import decode_loop, prefill

    cfg = port_config(args.model)
    params = port_params(cfg, args.dtype)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 16)), jnp.int32)
    steps = args.tokens - 1

    def run(trace_dir: Path | None = None) -> float:
        logits, cache = prefill(params, cfg, ids)  # outside the trace: only the loop is profiled
        jax.block_until_ready(cache)
        with jax.profiler.trace(str(trace_dir)) if trace_dir else contextlib.nullcontext():
            t = time.perf_counter()
            out = decode_loop(params, cfg, cache, logits, args.tokens, jnp.int32(-1), jnp.int32(0))
            jax.block_until_ready(out)
            return (time.perf_counter() - t) / steps * 1e3

    with jax.default_matmul_precision("highest"):
        run()  # compiles
        wall = statistics.median(run() for _ in range(args.repeats))
        tdir = Path(tempfile.mkdtemp(prefix="decode-profile-"))
        traced = run(tdir)
    rows = ops_per_step(tdir, steps)
    print(f"{args.model} {args.dtype} on {jax.default_backend()}: {wall:.2f} ms a step untraced "
          f"(median of {args.repeats}), {traced:.2f} ms traced; "
          f"{sum(r['per_step'] for r in rows):.0f} ops a step")
    print(f"{'op':<40} {'per step':>9} {'traced us/step':>15}")
    for r in rows[:args.top]:
        print(f"{r['op']:<40} {r['per_step']:>9.1f} {r['traced_us_per_step']:>15.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
