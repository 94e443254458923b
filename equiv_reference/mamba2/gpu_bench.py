"""Same-run GPU benchmark: the built-in Mamba-2 port against mamba_ssm on one GPU, one process.

    python -m equiv_reference.mamba2.gpu_bench --out gpu-bench            # the full report
    python -m equiv_reference.mamba2.gpu_bench --models 2.7b --prefill-lens 2048 --profile

Shapes: 130m (d_model 768, 24 layers) and 2.7b (d_model 2560, 64 layers), state 128, head dim 64,
expand 2, one group, chunk 256, vocab 50280, tied head; random weights (speed does not depend on
their values). For each implementation (`port`: equiv.mamba2 under jax.jit at matmul precision
"highest"; `mamba_ssm`: MambaLMHeadModel, its Triton kernels, CUDA graphs for decode; without
causal-conv1d's CUDA extension, so use_mem_eff_path=False: torch's conv1d before its Triton chunk
scan, and its decode step's conv in torch), model and
dtype (bf16 headline; fp32 with torch's TF32 off):

- prefill tok/s at each --prefill-lens, batch 1 (last-position logits, as generation needs), with
  model FLOP utilisation = model FLOPs per token x tok/s / the measured bf16 (or fp32) matmul rate;
- decode ms/token at each --decode-positions (a prompt of that length, then 64 greedy tokens;
  ms/token = (generate - prefill of the prompt) / 63), with HBM utilisation = bytes a step must
  read (weights, SSM and conv state read and written) / time / the measured copy bandwidth;
- medians of --repeats after a warm-up; the port's compile time separately.

Ceilings are measured on the card, in the same run: a large bf16 / fp32 matmul, a large device copy.
The table printed last carries the ratios port / mamba_ssm. `--profile` adds the port's top GPU
kernels by time (jax.profiler trace) for a prefill and a decode loop.

`--weight-layouts rows,columns` runs the port's measurements once per projection weight layout
(equiv/kblock.py: rows = stored (out, in), columns = stored (in, out), kblocks; auto = what the
port loads on this backend, honouring SSM_EQUIV_WEIGHT_LAYOUT); every port row records the layout
it ran with, and the table has a line per layout.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

SHAPES = {"130m": dict(d_model=768, n_layers=24), "2.7b": dict(d_model=2560, n_layers=64),
          "tiny": dict(d_model=64, n_layers=2)}  # tiny: the CPU test of this script's logic
COMMON = dict(vocab_size=50280, d_state=128, head_dim=64, n_groups=1, expand=2, conv_kernel=4, chunk_size=256)
NEW_TOKENS = 64


def log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def dims(model: str) -> dict:
    d = SHAPES[model] | COMMON
    d["d_inner"] = d["expand"] * d["d_model"]
    d["n_heads"] = d["d_inner"] // d["head_dim"]
    return d


def flops_per_token(model: str, with_head: bool) -> int:
    """Model FLOPs per token: projections (2 x multiply-adds), the chunked SSD's einsums, the head."""
    d = dims(model)
    in_dim = 2 * d["d_inner"] + 2 * d["n_groups"] * d["d_state"] + d["n_heads"]
    proj = d["d_model"] * in_dim + d["d_inner"] * d["d_model"]
    q, n, e = d["chunk_size"], d["d_state"], d["d_inner"]
    ssd = q * n * d["n_groups"] + q * e + 2 * e * n
    return 2 * d["n_layers"] * (proj + ssd) + (2 * d["d_model"] * d["vocab_size"] if with_head else 0)


def decode_bytes(model: str, dtype_bytes: int) -> int:
    """Bytes one decode step must move: every weight once (the tied head included), the float32
    SSM state read and written, the conv state read and written."""
    d = dims(model)
    in_dim = 2 * d["d_inner"] + 2 * d["n_groups"] * d["d_state"] + d["n_heads"]
    conv_dim = d["d_inner"] + 2 * d["n_groups"] * d["d_state"]
    per_layer = (d["d_model"] * in_dim + d["d_inner"] * d["d_model"] + conv_dim * 5 + d["d_inner"]
                 + d["d_model"])
    weights = dtype_bytes * (d["n_layers"] * per_layer + d["vocab_size"] * d["d_model"])
    state = 2 * 4 * d["n_layers"] * d["n_heads"] * d["head_dim"] * d["d_state"]
    conv = 2 * dtype_bytes * d["n_layers"] * (d["conv_kernel"] - 1) * conv_dim
    return weights + state + conv


def _median_time(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# ceilings


def ceilings() -> dict:
    import jax
    import jax.numpy as jnp

    out = {}
    for dtype in ("bfloat16", "float32"):
        n = 8192
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
        with jax.default_matmul_precision("highest"):
            mm = jax.jit(lambda x, y: x @ y)
            jax.block_until_ready(mm(a, b))
            t = _median_time(lambda mm=mm, a=a, b=b: mm(a, b), 10, jax.block_until_ready)
        out[f"matmul_{dtype}_tflops"] = 2 * n**3 / t / 1e12
    x = jnp.ones((1 << 29,), jnp.float32)  # 2 GiB
    cp = jax.jit(lambda v: v * 1.0001)
    jax.block_until_ready(cp(x))
    t = _median_time(lambda: cp(x), 10, jax.block_until_ready)
    out["copy_gb_s"] = 2 * x.size * 4 / t / 1e9  # bytes read plus bytes written
    log(f"ceilings {out}")
    return out


# ---------------------------------------------------------------------------------------------
# the port


def port_config(model: str):
    from equiv.mamba2.config import Mamba2Config

    d = dims(model)
    return Mamba2Config(vocab_size=d["vocab_size"], d_model=d["d_model"], n_layers=d["n_layers"],
                        d_state=d["d_state"], head_dim=d["head_dim"], n_heads=d["n_heads"], n_groups=1,
                        chunk_size=d["chunk_size"], tie_embeddings=True)


def resolve_layout(layout: str = "auto") -> str:
    """"auto" -> the layout Mamba2Port.load uses on this backend (SSM_EQUIV_WEIGHT_LAYOUT honoured)."""
    from equiv.kblock import LAYOUTS, weight_layout

    if layout == "auto":
        return weight_layout()
    if layout not in LAYOUTS:
        raise SystemExit(f"--weight-layouts: expected auto or one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


def port_params(cfg, dtype: str, layout: str = "auto"):
    """Random weights laid out as Mamba2Port.load lays them out on this backend, or in `layout`."""
    from equiv.kblock import for_backend
    from equiv.mamba2.port import PROJECTIONS
    from equiv_reference.mamba2.gpu_run import random_params

    return for_backend(random_params(cfg, dtype), PROJECTIONS, layout=resolve_layout(layout))


def port_rows(model: str, dtype: str, prefill_lens, positions, repeats: int, ceil: dict,
              layout: str = "auto") -> list[dict]:
    import jax
    import jax.numpy as jnp

    from equiv.mamba2.generate import decode_loop, prefill

    layout = resolve_layout(layout)
    log(f"port {model} {dtype}: weight layout {layout}")
    cfg = port_config(model)
    params = port_params(cfg, dtype, layout)
    rng = np.random.default_rng(0)
    rows = []
    with jax.default_matmul_precision("highest"):
        for length in prefill_lens:
            ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, length)), jnp.int32)
            t = time.perf_counter()
            jax.block_until_ready(prefill(params, cfg, ids))
            compile_s = time.perf_counter() - t
            sec = _median_time(lambda ids=ids: prefill(params, cfg, ids), repeats, jax.block_until_ready)
            rows.append(_prefill_row("port", model, dtype, length, sec, compile_s, ceil)
                        | {"weight_layout": layout})
        for pos in positions:
            ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, pos)), jnp.int32)
            eos, pad = jnp.int32(-1), jnp.int32(0)

            def run_loop(ids=ids, eos=eos, pad=pad):
                logits, cache = prefill(params, cfg, ids)
                jax.block_until_ready(cache)
                t0 = time.perf_counter()
                jax.block_until_ready(decode_loop(params, cfg, cache, logits, NEW_TOKENS, eos, pad)[0])
                return time.perf_counter() - t0

            t = time.perf_counter()
            run_loop()  # compiles prefill at this length and the loop
            compile_s = time.perf_counter() - t
            sec = statistics.median(run_loop() for _ in range(repeats))
            rows.append(_decode_row("port", model, dtype, pos, sec / (NEW_TOKENS - 1), compile_s, ceil)
                        | {"weight_layout": layout})
    return rows


def _prefill_row(impl, model, dtype, length, sec, compile_s, ceil) -> dict:
    tok_s = length / sec
    rate = ceil.get(f"matmul_{dtype}_tflops")
    mfu = flops_per_token(model, with_head=False) * tok_s / (rate * 1e12) if rate else None
    row = {"impl": impl, "model": model, "dtype": dtype, "what": "prefill", "length": length,
           "tok_s": tok_s, "mfu_of_measured_matmul": mfu, "compile_s": compile_s}
    log(f"{impl} {model} {dtype} prefill L={length}: {tok_s:,.0f} tok/s"
        + (f", MFU {mfu:.1%}" if mfu else "") + (f", compile {compile_s:.1f} s" if compile_s else ""))
    return row


def _decode_row(impl, model, dtype, pos, sec_per_token, compile_s, ceil) -> dict:
    nbytes = decode_bytes(model, 2 if dtype == "bfloat16" else 4)
    bw = ceil.get("copy_gb_s")
    util = nbytes / sec_per_token / (bw * 1e9) if bw else None
    row = {"impl": impl, "model": model, "dtype": dtype, "what": "decode", "position": pos,
           "ms_per_token": sec_per_token * 1e3, "bytes_per_step": nbytes, "hbm_util_of_measured_copy": util,
           "floor_ms": nbytes / (bw * 1e9) * 1e3 if bw else None, "compile_s": compile_s}
    log(f"{impl} {model} {dtype} decode at {pos}: {sec_per_token * 1e3:.3f} ms/token"
        + (f", HBM {util:.1%} (floor {row['floor_ms']:.2f} ms)" if util else ""))
    return row


# ---------------------------------------------------------------------------------------------
# mamba_ssm


def mamba_ssm_rows(model: str, dtype: str, prefill_lens, positions, repeats: int, ceil: dict) -> list[dict]:
    import torch

    from equiv_reference.mamba2.mamba_ssm_model import load_mamba_ssm_model

    mods = load_mamba_ssm_model()
    d = dims(model)
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = mods.config_mamba.MambaConfig(
        d_model=d["d_model"], n_layer=d["n_layers"], vocab_size=d["vocab_size"], rms_norm=True,
        residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True,
        ssm_cfg={"layer": "Mamba2", "d_state": d["d_state"], "headdim": d["head_dim"], "ngroups": 1,
                 "chunk_size": d["chunk_size"],
                 # causal-conv1d's CUDA extension is not installed (no wheel), so the fused
                 # mamba_split_conv1d_scan_combined cannot run: torch's conv, then the Triton scan
                 "use_mem_eff_path": False})
    torch.manual_seed(0)
    lm = mods.mixer_seq_simple.MambaLMHeadModel(config, device="cuda", dtype=tdtype).eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    sync = lambda _x: torch.cuda.synchronize()  # noqa: E731
    rows = []
    with torch.inference_mode():
        for length in prefill_lens:
            ids = torch.randint(0, d["vocab_size"], (1, length), device="cuda", generator=gen)
            fwd = lambda ids=ids: lm(ids, num_last_tokens=1)  # noqa: E731
            t = time.perf_counter()
            sync(fwd())  # Triton autotuning and compiles happen here
            warm = time.perf_counter() - t
            sec = _median_time(fwd, repeats, sync)
            rows.append(_prefill_row("mamba_ssm", model, dtype, length, sec, warm, ceil))
        for pos in positions:
            ids = torch.randint(0, d["vocab_size"], (1, pos), device="cuda", generator=gen)
            def gen_fn(ids=ids, pos=pos):
                return lm.generate(ids, max_length=pos + NEW_TOKENS, cg=True, top_k=1)

            fwd = lambda ids=ids: lm(ids, num_last_tokens=1)  # noqa: E731
            t = time.perf_counter()
            sync(gen_fn())  # captures the CUDA graph for this batch and max length
            warm = time.perf_counter() - t
            t_gen = _median_time(gen_fn, repeats, sync)
            t_pre = _median_time(fwd, repeats, sync)
            rows.append(_decode_row("mamba_ssm", model, dtype, pos, (t_gen - t_pre) / (NEW_TOKENS - 1), warm,
                                    ceil))
    lm = None  # noqa: F841 - frees the model before the next case
    torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# profile


def device_ops(trace_dir: Path) -> list[tuple[str, float]] | None:
    """(name, us) of every op the device ran, from the jax.profiler trace under trace_dir (None: no
    trace file). With a GPU in the trace: the GPU process's kernels. Without: the ops on XLA:CPU's
    threads (its Eigen pool's and the client's, which runs small ops inline), leaving out runtime
    bookkeeping events (names with "::", e.g. ThunkExecutor::Execute, and "end: " markers)."""
    files = sorted(trace_dir.rglob("*.trace.json.gz")) or sorted(trace_dir.rglob("perfetto_trace.json.gz"))
    if not files:
        return None
    data = json.loads(gzip.open(files[-1]).read())
    events = data["traceEvents"] if isinstance(data, dict) else data
    meta = [(e, str(e.get("args", {}).get("name", ""))) for e in events if e.get("ph") == "M"]
    gpu_pids = {e["pid"] for e, name in meta if e.get("name") == "process_name" and "gpu" in name.lower()}
    xla_threads = {(e["pid"], e.get("tid")) for e, name in meta
                   if e.get("name") == "thread_name" and name.startswith("tf_XLA")}

    def ran_on_device(e) -> bool:
        if gpu_pids:
            return e.get("pid") in gpu_pids
        name = e.get("name", "")
        bookkeeping = "::" in name or name.startswith("end: ")
        return (e.get("pid"), e.get("tid")) in xla_threads and not bookkeeping

    return [(e["name"], float(e.get("dur", 0))) for e in events if e.get("ph") == "X" and ran_on_device(e)]


def top_kernels(trace_dir: Path, top: int = 15) -> dict:
    """The device's kernel time by name (device_ops), with the total and the launch count."""
    ops = device_ops(trace_dir)
    if ops is None:
        return {"error": f"no trace file under {trace_dir}"}
    total, count = Counter(), Counter()
    for name, us in ops:
        total[name] += us
        count[name] += 1
    all_us = sum(total.values()) or 1.0
    return {"gpu_kernel_us": round(all_us, 1), "kernel_launches": sum(count.values()),
            "top": [{"kernel": k[:120], "us": round(v, 1), "share": round(v / all_us, 4), "calls": count[k]}
                    for k, v in total.most_common(top)]}


def profile_port(model: str, dtype: str, length: int, out: Path, layout: str = "auto",
                 whats=("prefill", "decode")) -> dict:
    """Top GPU kernels of one prefill at `length` and of one decode loop (NEW_TOKENS - 1 steps after
    a 16-token prompt), with the total kernel time and launch count."""
    import jax
    import jax.numpy as jnp

    from equiv.mamba2.generate import decode_loop, prefill

    cfg = port_config(model)
    params = port_params(cfg, dtype, layout)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, length)), jnp.int32)
    short = ids[:, :16]
    result = {}
    with jax.default_matmul_precision("highest"):
        if "prefill" in whats:
            jax.block_until_ready(prefill(params, cfg, ids))
        logits, cache = prefill(params, cfg, short)
        eos, pad = jnp.int32(-1), jnp.int32(0)
        jax.block_until_ready(decode_loop(params, cfg, cache, logits, NEW_TOKENS, eos, pad))
        result["weight_layout"] = resolve_layout(layout)
        for what in whats:
            tdir = Path(tempfile.mkdtemp(prefix=f"trace-{model}-{dtype}-{what}-"))  # not under --out: deep
            logits, cache = prefill(params, cfg, short)
            jax.block_until_ready(cache)
            with jax.profiler.trace(str(tdir), create_perfetto_trace=True):
                if what == "prefill":
                    jax.block_until_ready(prefill(params, cfg, ids))
                else:
                    jax.block_until_ready(decode_loop(params, cfg, cache, logits, NEW_TOKENS, eos, pad))
            result[what] = top_kernels(tdir)
            steps = NEW_TOKENS - 1 if what == "decode" else 1
            if "gpu_kernel_us" in result[what]:
                us, launches = result[what]["gpu_kernel_us"] / steps, result[what]["kernel_launches"] / steps
                log(f"profile {model} {dtype} {what}: GPU kernels {us:,.1f} us and {launches:,.1f} launches "
                    f"per {what} step")
            for r in result[what].get("top", [])[:12]:
                log(f"profile {model} {dtype} {what}: {r}")
    return result


# ---------------------------------------------------------------------------------------------
# report


def table(rows: list[dict]) -> str:
    """One line per (model, dtype, what, length/position) and port weight layout: port, mamba_ssm,
    ratio port/mamba_ssm (speed ratio: >1 means the port is faster)."""
    key = lambda r: (r["model"], r["dtype"], r["what"], r.get("length") or r.get("position"))  # noqa: E731
    by = {}
    for r in rows:
        impl = f"port:{r.get('weight_layout', '-')}" if r["impl"] == "port" else r["impl"]
        by.setdefault(key(r), {})[impl] = r
    lines = [f"{'model':<6} {'dtype':<9} {'what':<8} {'L/pos':>6} {'layout':>8} {'port':>14} "
             f"{'mamba_ssm':>14} {'port/mamba_ssm':>14} {'port util':>10}"]
    for k in sorted(by, key=lambda k: (k[0], k[1], k[2], k[3])):
        m = by[k].get("mamba_ssm")
        layouts = sorted(i.split(":", 1)[1] for i in by[k] if i.startswith("port:")) or ["-"]
        for layout in layouts:
            lines.append(_table_line(k, layout, by[k].get(f"port:{layout}"), m))
    return "\n".join(lines)


def _table_line(k, layout, p, m) -> str:
    if k[2] == "prefill":
        fmt = lambda r: f"{r['tok_s']:,.0f} tok/s" if r else "-"  # noqa: E731
        ratio = p["tok_s"] / m["tok_s"] if p and m else None
        util = p.get("mfu_of_measured_matmul") if p else None
    else:
        fmt = lambda r: f"{r['ms_per_token']:.3f} ms" if r else "-"  # noqa: E731
        ratio = m["ms_per_token"] / p["ms_per_token"] if p and m else None
        util = p.get("hbm_util_of_measured_copy") if p else None
    return (f"{k[0]:<6} {k[1]:<9} {k[2]:<8} {k[3]:>6} {layout:>8} {fmt(p):>14} {fmt(m):>14} "
            f"{(f'{ratio:.2f}x' if ratio else '-'):>14} {(f'{util:.1%}' if util else '-'):>10}")


def environment() -> dict:
    import jax

    env = {"python": platform.python_version(), "jax": jax.__version__,
           "devices": [str(d) for d in jax.devices()],
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "matmul_precision": "highest"}
    try:
        import torch
        import triton

        env |= {"torch": torch.__version__, "triton": triton.__version__,
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                "torch_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}
        from importlib.metadata import version

        env["mamba_ssm"] = version("mamba-ssm")
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        env["torch_side"] = f"{type(e).__name__}: {e}"
    return env


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-bench")
    ap.add_argument("--models", default="130m,2.7b")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--impls", default="port,mamba_ssm")
    ap.add_argument("--prefill-lens", default="2048")
    ap.add_argument("--sweep-lens", default="512,1024,4096,8192,16384,32768,65536",
                    help="extra prefill lengths, bf16 only (the fp32 table takes --prefill-lens)")
    ap.add_argument("--decode-positions", default="16,8192")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", nargs="?", const="prefill,decode", default="",
                    help="also the port's top GPU kernels (bf16): of a prefill at L=2048 and/or of a "
                         "decode loop (--profile, --profile decode)")
    ap.add_argument("--no-ceilings", action="store_true")
    ap.add_argument("--weight-layouts", default="auto",
                    help="the port's projection layouts to measure, e.g. rows,columns (equiv/kblock.py; "
                         "auto: the backend's, SSM_EQUIV_WEIGHT_LAYOUT honoured)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layouts = [resolve_layout(x.strip()) for x in args.weight_layouts.split(",") if x.strip()]
    report = {"environment": environment(), "command": " ".join(sys.argv), "rows": [], "errors": [],
              "weight_layouts": layouts}
    report["ceilings"] = {} if args.no_ceilings else ceilings()
    save = lambda: (out / "gpu-bench.json").write_text(json.dumps(report, indent=1, default=str))  # noqa: E731
    impls = {"port": port_rows, "mamba_ssm": mamba_ssm_rows}
    for model in args.models.split(","):
        for dtype in args.dtypes.split(","):
            lens = _ints(args.prefill_lens) + (_ints(args.sweep_lens) if dtype == "bfloat16" else [])
            runs = [(impl, {"layout": x} if impl == "port" else {}) for impl in args.impls.split(",")
                    for x in (layouts if impl == "port" else [None])]
            for impl, kw in runs:
                try:  # one failing case must not lose the others' figures
                    report["rows"] += impls[impl](model, dtype, sorted(set(lens)),
                                                  _ints(args.decode_positions), args.repeats,
                                                  report["ceilings"], **kw)
                except Exception as e:  # noqa: BLE001
                    msg = f"{impl} {kw.get('layout', '')} {model} {dtype}: {type(e).__name__}: {str(e)[:500]}"
                    log(f"FAILED {msg}")
                    report["errors"].append(msg)
                save()
            if args.profile and dtype == "bfloat16" and "port" in args.impls:
                try:
                    report.setdefault("profile", {})[model] = {
                        x: profile_port(model, dtype, 2048, out, x, tuple(args.profile.split(",")))
                        for x in layouts}
                except Exception as e:  # noqa: BLE001 - the figures above are kept
                    report["errors"].append(f"profile {model}: {type(e).__name__}: {str(e)[:500]}")
                save()
    text = table(report["rows"])
    (out / "gpu-bench.txt").write_text(text + "\n")
    save()
    print(json.dumps(report["ceilings"]))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
