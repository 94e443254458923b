"""CPU benchmark: prefill tokens/s and decode ms/token of the built-in Mamba-1 port against transformers'
`MambaForCausalLM` on its torch path, on a 130m-shaped Mamba-1, in one process on one machine.

    python -m equiv_reference.mamba1.bench [--quick] [--rounds N] [--json PATH] [--tiny]

Model: the shapes of state-spaces/mamba-130m (d_model 768, 24 layers, d_state 16, expand 2, d_conv 4,
dt_rank 48, vocab 50280, tied head), float32, batch 1, random weights from transformers' own
initialisation (seed 0), written once as a MambaForCausalLM safetensors checkpoint into a cache
directory (speed does not depend on the weights' values; a config marker makes a changed shape
rebuild it). `--tiny` (2 layers, d_model 64, 2 rounds) is for the test suite.

Method (as the Mamba-2 bench's). Prefill: L=512, a forward over the prompt returning the last
position's logits and the cache. Decode: greedy, 32 new tokens after a 16-token prompt; ms/token =
(generate time - prefill time of the same prompt) / 32. Every contender is called once to compile /
warm it (its first-call time minus its warm median is reported as compile time), then timed in
interleaved rounds (each round runs every contender once, alternating the order, so a change in
machine load hits all of them alike); medians over rounds are reported, with the ratios port /
transformers and the ceiling that this machine's measured float32 matmul throughput and matvec read
bandwidth put on any float32 implementation.

transformers runs as the project's reference runner runs it (equiv_reference/mamba1/transformers_runner.py):
the module imported and the checkpoint loaded with the kernel packages hidden, use_mambapy=False in
the checkpoint's config, every dispatched function running its torch body through the provenance
module's DispatchRecorder, torch.inference_mode, torch threads = all cores. Which scan branch ran is
observed by the recorder's line tracer on one untimed prefill and one untimed generate before the
warm-up; the timed calls run the same shims with the tracer off (its per-line callback would slow the
sequential loop it watches) and count their scan calls.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

PREFILL_LEN, PROMPT_LEN, NEW_TOKENS = 512, 16, 32
SEED = 0
BENCH_130M = dict(
    vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, expand=2, conv_kernel=4,
    time_step_rank=48, tie_word_embeddings=True, use_bias=False, use_conv_bias=True, residual_in_fp32=True,
    layer_norm_epsilon=1e-5, hidden_act="silu", use_mambapy=False, pad_token_id=0, bos_token_id=0,
    eos_token_id=0,
)
# the full vocabulary keeps the tiny decode step measurable (the head is most of its work)
TINY = BENCH_130M | dict(hidden_size=64, num_hidden_layers=2, time_step_rank=4)
DEFAULT_CACHE = Path("/tmp") / "ssm-equiv-bench" / "mamba1-130m"
_MARKER = "bench-config.json"


# ---------------------------------------------------------------------------------------------
# the model: checkpoint, cost per token


def build_checkpoint(cache_dir: Path, shape: dict) -> Path:
    """The cached transformers checkpoint directory, built on first use (130m: about 10 s, 0.5 GB)."""
    marker = cache_dir / _MARKER
    want = {"config": shape, "seed": SEED}
    if marker.is_file() and (cache_dir / "model.safetensors").is_file():
        try:
            if json.loads(marker.read_text()) == want:
                return cache_dir
        except (OSError, ValueError):
            pass
    import torch
    from transformers import MambaConfig

    from equiv_reference import provenance as prov
    from equiv_reference.mamba1.provenance import import_modeling

    mm = import_modeling("mamba")
    torch.manual_seed(SEED)
    with prov.kernel_packages_hidden():
        model = mm.MambaForCausalLM(MambaConfig(**shape)).to(torch.float32).eval()
    cache_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cache_dir)
    marker.write_text(json.dumps(want, indent=1))
    return cache_dir


def _dims(s: dict):
    d, n, r, k = s["hidden_size"], s["state_size"], s["time_step_rank"], s["conv_kernel"]
    return d, s["expand"] * d, n, r, k


def projection_flops_per_token(s: dict) -> int:
    """2 x multiply-adds per token of every layer's in_proj, x_proj, dt_proj and out_proj (the prefill
    sends only the last position through the head, so the head is not counted; the selective scan is
    elementwise work, not matmul)."""
    d, e, n, r, _ = _dims(s)
    return 2 * s["num_hidden_layers"] * (d * 2 * e + e * (r + 2 * n) + r * e + e * d)


def weight_bytes(s: dict) -> int:
    """float32 bytes a decode step must read: every layer's weights, the final norm and the (tied) head."""
    d, e, n, r, k = _dims(s)
    per_layer = (d + d * 2 * e + e * (k + int(s["use_conv_bias"])) + e * (r + 2 * n) + r * e + e
                 + e * n + e + e * d)
    return 4 * (s["num_hidden_layers"] * per_layer + d + s["vocab_size"] * d)


def _wall(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure_peaks(shape: dict, reps: int) -> dict:
    """float32 matmul GFLOP/s (XLA and torch) on the prefill's in_proj matmul, and XLA matvec read
    bandwidth GB/s (a decode-shaped product with a 256 MB matrix; 16 MB for --tiny)."""
    import torch

    d, e = shape["hidden_size"], 2 * shape["expand"] * shape["hidden_size"]  # in_proj: d -> 2 d_inner
    a = np.random.default_rng(0).standard_normal((PREFILL_LEN, d), dtype=np.float32)
    w = np.random.default_rng(1).standard_normal((d, e), dtype=np.float32)
    flops = 2 * PREFILL_LEN * d * e
    mm = jax.jit(jnp.matmul)
    ja, jw = jnp.asarray(a), jnp.asarray(w)
    jax.block_until_ready(mm(ja, jw))
    xla = min(_wall(lambda: jax.block_until_ready(mm(ja, jw))) for _ in range(reps * 4))
    ta, tw = torch.from_numpy(a), torch.from_numpy(w)
    torch.matmul(ta, tw)
    tt = min(_wall(lambda: torch.matmul(ta, tw)) for _ in range(reps * 4))
    rows = 4096 if d >= 256 else 1024
    big = jnp.asarray(np.random.default_rng(2).standard_normal((rows, 16384 if d >= 256 else 4096),
                                                               dtype=np.float32))
    vec = jnp.ones((1, rows), jnp.float32)
    jax.block_until_ready(mm(vec, big))
    t_mv = statistics.median(_wall(lambda: jax.block_until_ready(mm(vec, big))) for _ in range(reps * 2))
    return {"xla_matmul_gflops": flops / xla / 1e9, "torch_matmul_gflops": flops / tt / 1e9,
            "matvec_read_gbps": big.size * 4 / t_mv / 1e9,
            "matmul_shape": f"({PREFILL_LEN}, {d}) @ ({d}, {e}) float32",
            "matvec_matrix_mb": big.size * 4 / 1e6}


def ceilings(peaks: dict, shape: dict) -> dict:
    """The best any float32 implementation can do here: prefill at the measured matmul peak (the faster
    of XLA and torch) doing only the projections, decode reading every weight once at the measured
    matvec bandwidth."""
    gf = max(peaks["xla_matmul_gflops"], peaks["torch_matmul_gflops"]) * 1e9
    proj, wb = projection_flops_per_token(shape), weight_bytes(shape)
    return {"projection_mflop_per_token": proj / 1e6, "prefill_tokens_per_s_ceiling": gf / proj,
            "decode_weight_mb_per_token": wb / 1e6,
            "decode_ms_per_token_floor": 1e3 * wb / (peaks["matvec_read_gbps"] * 1e9)}


# ---------------------------------------------------------------------------------------------
# contenders


@dataclass
class Contender:
    """One timed callable. kind: 'prefill' (L=512), 'generate' or 'prefill16' (its prompt's prefill)."""

    impl: str
    kind: str
    fn: object
    first_s: float = 0.0
    runs: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs)


def port_contenders(ckpt: Path, prefill_ids, prompt):
    from equiv.mamba1.generate import generate, prefill
    from equiv.mamba1.port import Mamba1Port

    loaded = Mamba1Port().load(ckpt)  # as the harness loads it: K-blocked projections on CPU
    params, cfg, mode = loaded.params, loaded.cfg, loaded.scan_mode

    def jax_call(fn):
        def run():
            with jax.default_matmul_precision(loaded.precision):
                return jax.block_until_ready(fn())
        return run

    def gen():
        tokens, _, steps, _ = generate(params, cfg, prompt, None, NEW_TOKENS)
        return tokens, steps

    contenders = [Contender("port", "prefill",
                            jax_call(partial(prefill, params, cfg, prefill_ids, None, mode))),
                  Contender("port", "generate", jax_call(gen)),
                  Contender("port", "prefill16", jax_call(partial(prefill, params, cfg, prompt, None, mode)))]
    info = loaded.info()
    return contenders, {"implementation": info.details["implementation"], "scan": mode,
                        "precision": loaded.precision, "backend": info.details["backend"],
                        "decode": "on-device lax.while_loop (equiv.mamba1.generate.generate)"}


def transformers_contenders(ckpt: Path, prefill_ids, prompt):
    import torch
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    from equiv_reference import provenance as prov
    from equiv_reference.mamba1.provenance import SCAN, DispatchRecorder, import_modeling

    class Recorder(DispatchRecorder):
        """DispatchRecorder whose scan line tracer can be switched off for the timed calls."""

        trace = True
        untraced_scan_calls = 0

        def _traced_scan(self, body, args, kwargs):
            if self.trace:
                return super()._traced_scan(body, args, kwargs)
            self.untraced_scan_calls += 1
            return body(*args, **kwargs)

    hf_logging.disable_progress_bar()
    mm = import_modeling("mamba")
    with prov.kernel_packages_hidden():
        model = mm.MambaForCausalLM.from_pretrained(ckpt, local_files_only=True, dtype=torch.float32).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    model.generation_config = GenerationConfig(pad_token_id=pad)  # no eos: always 32 tokens
    recorder = Recorder(mm)
    ids_t = torch.as_tensor(np.array(prefill_ids), dtype=torch.long)  # a writable copy
    prompt_t = torch.as_tensor(np.array(prompt), dtype=torch.long)
    ones = torch.ones_like(prompt_t)

    def recorded(fn):
        def run():
            with torch.inference_mode(), recorder:
                return fn()
        return run

    def gen():
        out = model.generate(prompt_t, attention_mask=ones, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1)
        if out.shape[1] != PROMPT_LEN + NEW_TOKENS:
            raise RuntimeError(f"transformers generated {out.shape[1] - PROMPT_LEN} tokens, "
                               f"expected {NEW_TOKENS}")
        return out

    def prefill(ids):
        return lambda: model(ids, use_cache=True, logits_to_keep=1)

    contenders = [Contender("transformers", "prefill", recorded(prefill(ids_t))),
                  Contender("transformers", "generate", recorded(gen)),
                  Contender("transformers", "prefill16", recorded(prefill(prompt_t)))]

    # provenance: one untimed traced prefill and generate; every scan must take the sequential loop
    recorded(prefill(ids_t))()
    recorder.require_called(SCAN, "causal_conv1d_fn", what="the benchmark's prefill")
    recorder.require_sequential_scan(what="the benchmark's prefill")
    recorded(gen)()
    recorder.require_sequential_scan(what="the benchmark's generate")
    recorder.trace = False
    mixers = [layer.mixer for layer in model.backbone.layers]
    details = {"class": f"{type(model).__module__}.{type(model).__qualname__}",
               "use_mambapy": sorted({bool(m.use_mambapy) for m in mixers}),
               "use_associative_scan": sorted({bool(getattr(m, "use_associative_scan", False))
                                               for m in mixers}),
               "mambapy_importable": prov.package_installed("mambapy"),
               "kernel_packages_hidden_at_import": True, "grad_mode": "torch.inference_mode"}
    return contenders, recorder, details


# ---------------------------------------------------------------------------------------------
# run, summarise, print


def run(contenders: list[Contender], rounds: int, log) -> None:
    for c in contenders:
        log(f"  warm-up {c.impl} / {c.kind}")
        c.first_s = _wall(c.fn)  # compiles (JAX) / allocates (torch)
    for r in range(rounds):
        for c in contenders if r % 2 == 0 else contenders[::-1]:
            c.runs.append(_wall(c.fn))
        log(f"  round {r + 1}/{rounds} done (load {os.getloadavg()[0]:.2f})")


def summarise(contenders: list[Contender]) -> dict:
    """{impl: figures}: prefill tok/s, decode ms/token, per-round values and compile times."""
    by = {(c.impl, c.kind): c for c in contenders}
    out = {}
    for impl in dict.fromkeys(c.impl for c in contenders):
        pre, gen, p16 = by[(impl, "prefill")], by[(impl, "generate")], by[(impl, "prefill16")]
        ms = [1e3 * (g - p) / NEW_TOKENS for g, p in zip(gen.runs, p16.runs, strict=True)]
        out[impl] = {
            "prefill_median_s": pre.median_s, "prefill_tokens_per_s": PREFILL_LEN / pre.median_s,
            "prefill_runs_s": pre.runs,
            "generate_median_s": gen.median_s, "generate_runs_s": gen.runs,
            "prefill16_median_s": p16.median_s, "prefill16_runs_s": p16.runs,
            "decode_ms_per_token": 1e3 * (gen.median_s - p16.median_s) / NEW_TOKENS,
            "decode_ms_per_token_runs": ms,
            "first_call_s": {c.kind: c.first_s for c in (pre, gen, p16)},
            "compile_s": {c.kind: max(c.first_s - c.median_s, 0.0) for c in (pre, gen, p16)},
        }
    return out


def ratios(figures: dict) -> dict:
    """port / transformers of each figure (tokens/s: > 1 is the port faster; ms/token: < 1 is)."""
    p, t = figures["port"], figures["transformers"]
    pre_rounds = [b / a for a, b in zip(p["prefill_runs_s"], t["prefill_runs_s"], strict=True)]
    dec_rounds = [a / b for a, b in zip(p["decode_ms_per_token_runs"], t["decode_ms_per_token_runs"],
                                        strict=True)]
    return {"prefill_tokens_per_s": {"ratio": p["prefill_tokens_per_s"] / t["prefill_tokens_per_s"],
                                     "per_round": pre_rounds, "port_faster_when": "> 1"},
            "decode_ms_per_token": {"ratio": p["decode_ms_per_token"] / t["decode_ms_per_token"],
                                    "per_round": dec_rounds, "port_faster_when": "< 1"}}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "torch", "transformers", "numpy", "ssm-equiv"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def print_report(rep: dict) -> None:
    m, f, c, p = rep["machine"], rep["figures"], rep["ceilings"], rep["peaks"]
    print(f"\nMamba-1 {rep['model']['shape']}, float32, batch 1 | {m['cpu']} x {m['cores']} cores | load "
          f"{m['load_at_start'][0]:.2f} at start, {m['load_after'][0]:.2f} after (1-min); "
          f"{rep['method']['rounds']} interleaved rounds")
    print(f"versions: {rep['versions']}")
    print(f"threads: torch {m['torch_threads']}, XLA_FLAGS={m['xla_flags']!r}; port: scan "
          f"{rep['port']['scan']!r}, precision {rep['port']['precision']!r}; transformers scan: "
          f"{rep['transformers']['scan_implementation']}")
    print(f"\n{'implementation':<14} {'prefill L=512':>15} {'of ceiling':>10} {'decode':>14} {'floor/ms':>9}"
          f" {'compile':>22}")
    for impl in ("port", "transformers"):
        r = f[impl]
        comp = r["compile_s"]
        print(f"{impl:<14} {r['prefill_tokens_per_s']:9.1f} tok/s "
              f"{r['prefill_tokens_per_s'] / c['prefill_tokens_per_s_ceiling']:9.1%} "
              f"{r['decode_ms_per_token']:8.2f} ms/tok "
              f"{c['decode_ms_per_token_floor'] / r['decode_ms_per_token']:8.1%} "
              f"   {comp['prefill']:5.1f}s + {comp['generate']:5.1f}s gen")
    for impl in ("port", "transformers"):
        r = f[impl]
        print(f"  {impl} runs: prefill [{', '.join(f'{x:.3f}' for x in r['prefill_runs_s'])}] s; "
              f"decode [{', '.join(f'{x:.2f}' for x in r['decode_ms_per_token_runs'])}] ms/tok")
    print("\nratios port / transformers:")
    for k, v in rep["ratios"].items():
        pr = sorted(v["per_round"])
        print(f"  {k:<22} {v['ratio']:6.2f}x   (rounds {pr[0]:.2f}-{pr[-1]:.2f}x; port faster when "
              f"{v['port_faster_when']})")
    print(f"\nceiling: measured fp32 matmul {p['xla_matmul_gflops']:.0f} GFLOP/s (XLA), "
          f"{p['torch_matmul_gflops']:.0f} GFLOP/s (torch) on {p['matmul_shape']}; the projections cost "
          f"{c['projection_mflop_per_token']:.0f} MFLOP/token, so no float32 prefill exceeds "
          f"{c['prefill_tokens_per_s_ceiling']:.0f} tok/s here.")
    print(f"decode floor: a step reads {c['decode_weight_mb_per_token']:.0f} MB of float32 weights; at the "
          f"measured {p['matvec_read_gbps']:.1f} GB/s matvec read bandwidth that is "
          f"{c['decode_ms_per_token_floor']:.2f} ms/token ('floor/ms' above: floor / measured).")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 timed rounds instead of 5")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (median reported; >= 3)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--tiny", action="store_true",
                    help="a 2-layer d_model 64 model and 2 rounds (for the test suite; figures mean nothing)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch intra-op threads (default: all cores). On a loaded machine fewer can be much "
                         "faster for the decode's many small ops (OpenMP threads wait on descheduled ones)")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help=f"where the checkpoint is cached (default {DEFAULT_CACHE}[-tiny])")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.tiny else 3 if args.quick else 5)
    if rounds < (1 if args.tiny else 3):
        ap.error(f"--rounds: expected >= 3 (a median of fewer is noise), got {rounds}")
    shape = TINY if args.tiny else BENCH_130M
    cache = args.cache_dir or (DEFAULT_CACHE.with_name(DEFAULT_CACHE.name + "-tiny") if args.tiny
                               else DEFAULT_CACHE)
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    load_at_start = os.getloadavg()
    import torch

    torch.set_num_threads(args.torch_threads or os.cpu_count())
    log(f"checkpoint: {build_checkpoint(cache, shape)}")
    rng = np.random.default_rng(0)
    prefill_ids = jnp.asarray(rng.integers(0, shape["vocab_size"], (1, PREFILL_LEN)), jnp.int32)
    prompt = jnp.asarray(rng.integers(0, shape["vocab_size"], (1, PROMPT_LEN)), jnp.int32)
    log("measuring matmul throughput and bandwidth")
    peaks = measure_peaks(shape, 1 if args.tiny else 3 if args.quick else 5)
    log("loading: built-in port, transformers (plus one untimed traced call of each transformers path)")
    port, port_info = port_contenders(cache, prefill_ids, prompt)
    tf, recorder, tf_info = transformers_contenders(cache, prefill_ids, prompt)
    traced = recorder.record()
    gc.collect()
    run(port + tf, rounds, log)
    figures = summarise(port + tf)
    record = recorder.record()
    report = {
        "model": {"shape": "130m-shaped" if not args.tiny else "tiny", "config": shape, "dtype": "float32",
                  "weights": f"random (transformers MambaForCausalLM init, seed {SEED})",
                  "checkpoint": str(cache)},
        "method": {"prefill_len": PREFILL_LEN, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "batch": 1,
                   "rounds": rounds, "statistic": "median over interleaved rounds after one warm-up call",
                   "decode_ms_per_token": f"(generate time - prefill time of the {PROMPT_LEN}-token prompt) "
                                          f"/ {NEW_TOKENS}",
                   "compile_s": "first call - warm median"},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "platform": platform.platform(),
                    "load_at_start": load_at_start, "load_after": os.getloadavg()},
        "versions": versions(),
        "port": port_info,
        "transformers": {
            **tf_info,
            "scan_implementation": traced["scan"]["implementation"],
            "scan_calls_by_branch_traced": traced["scan"]["calls_by_branch"],
            "scan_calls_timed_untraced": recorder.untraced_scan_calls,
            "scan_detected_by": "a line tracer on the scan body's frame during one untimed prefill and "
                                "generate; the timed calls ran the same torch bodies with the tracer off",
            "dispatch": record},
        "peaks": peaks, "ceilings": ceilings(peaks, shape), "figures": figures,
    }
    report["ratios"] = ratios(figures)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
        print(f"\nwrote {args.json}")
    bad = [k for impl in figures.values() for k in ("prefill_tokens_per_s", "decode_ms_per_token")
           if not (math.isfinite(impl[k]) and impl[k] > 0)]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
