"""CPU benchmark: prefill tokens/s and decode ms/token of the built-in port against transformers
(torch fallback path) and mamba2-jax 1.1.2, on a 130m-shaped Mamba-2, in one process on one machine.

    python -m equiv_reference.mamba2.bench [--quick] [--json bench.json] [--wait-idle 300]

Method. Prefill: batch 1, L=512, a forward over the prompt returning the next-token logits and the
cache. Decode: greedy, 32 new tokens after a 16-token prompt; ms/token = (generate time - prefill
time of the same prompt) / 32. Every contender is compiled/warmed first (its first-call time minus
its warm median is reported as compile time), then timed in interleaved rounds (each round runs
every contender once, so a change in machine load hits all of them alike); the median over rounds
is reported. Asserts nothing: it prints figures, ratios against the targets, and the ceiling that
this machine's measured matmul throughput and memory bandwidth put on any float32 implementation.
"""

from __future__ import annotations

import argparse
import gc
import json
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

from equiv_reference.mamba2.bench_model import (
    BENCH_130M,
    DEFAULT_CACHE,
    PREFILL_LEN,
    build_bench_checkpoint,
    ceilings,
    measure_peaks,
)

PROMPT_LEN, NEW_TOKENS = 16, 32
TARGETS = {"prefill_vs_mamba2_jax": 1.5, "prefill_vs_transformers": 2.5, "decode_vs_transformers": 0.8}


@dataclass
class Contender:
    """One timed callable. kind: 'prefill' (512 tokens) or 'generate' / 'prefill16' (decode)."""

    impl: str
    variant: str
    kind: str
    fn: object
    first_s: float = 0.0
    runs: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs)


def _jax_call(fn):
    return lambda: jax.block_until_ready(fn())


def _wall(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------
# contenders


def builtin_contenders(ckpt: Path, prefill_ids, prompt) -> list[Contender]:
    from equiv.mamba2.generate import generate, prefill
    from equiv.mamba2.port import Mamba2Port

    loaded = Mamba2Port().load(ckpt)
    params, cfg = loaded.params, loaded.cfg
    out = []
    for chunk in (cfg.chunk_size, 64):
        c = cfg.replace(chunk_size=chunk)
        label = f"chunk {chunk}" + (" (config)" if chunk == cfg.chunk_size else " (override)")
        run_prefill = _jax_call(partial(prefill, params, c, prefill_ids))
        out.append(Contender("builtin", label, "prefill", run_prefill))
    # decode steps do not depend on chunk_size (one token, no chunking); the prompt prefill does
    # not matter either at 16 tokens < any chunk
    out.append(Contender("builtin", "on-device loop", "generate",
                         _jax_call(lambda: generate(params, cfg, prompt, None, NEW_TOKENS)[0])))
    out.append(Contender("builtin", "on-device loop", "prefill16",
                         _jax_call(partial(prefill, params, cfg, prompt))))
    return out


@jax.jit
def _mamba2_jax_prefill_last(model, ids):
    """The package's own modules, only the last position through the head (as ours and transformers'
    `logits_to_keep=1` do); mirrors `Mamba2ForCausalLM.__call__`."""
    out = model.backbone(input_ids=ids)
    last = out["last_hidden_state"][:, -1]
    if model.cfg.tie_word_embeddings:
        return last @ model.backbone.embedder.embedding[:].T, out["cache"]
    return model.lm_head(last), out["cache"]


def mamba2_jax_contenders(ckpt: Path, prefill_ids, prompt) -> list[Contender]:
    import mamba2_jax

    from equiv.mamba2 import mamba2_jax_adapter as adapter

    loaded = adapter.Mamba2JaxPort().load(ckpt)
    model = loaded.model
    prompt_np = np.asarray(prompt)
    return [
        Contender("mamba2-jax", "backbone + last-position head", "prefill",
                  _jax_call(lambda: _mamba2_jax_prefill_last(model, prefill_ids))),
        Contender("mamba2-jax", "public forward (all 512 logits)", "prefill",
                  _jax_call(lambda: mamba2_jax.forward(model, prefill_ids))),
        # its only decode path: a cached forward of one token (padded to chunk_size inside)
        Contender("mamba2-jax", "cached forward per token", "generate",
                  lambda: loaded.generate(prompt_np, None, NEW_TOKENS)),
        Contender("mamba2-jax", "cached forward per token", "prefill16",
                  _jax_call(lambda: adapter._prefill(model, prompt))),
    ]


def transformers_contenders(ckpt: Path, prefill_ids, prompt):
    import torch

    from equiv_reference.mamba2.dispatch import DispatchRecorder, import_modeling_mamba2

    mm = import_modeling_mamba2()
    model = mm.Mamba2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    model.generation_config.pad_token_id = model.config.pad_token_id
    recorder = DispatchRecorder(mm)
    ids_t = torch.as_tensor(np.array(prefill_ids), dtype=torch.long)
    prompt_t = torch.as_tensor(np.array(prompt), dtype=torch.long)
    ones = torch.ones_like(prompt_t)

    def recorded(fn):
        def run():
            with torch.inference_mode(), recorder:
                return fn()
        return run

    def gen():
        out = model.generate(prompt_t, attention_mask=ones, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False)
        if out.shape[1] != PROMPT_LEN + NEW_TOKENS:
            raise RuntimeError(f"transformers generated {out.shape[1] - PROMPT_LEN} tokens, "
                               f"expected {NEW_TOKENS}")
        return out

    contenders = [
        Contender("transformers", "torch fallback", "prefill",
                  recorded(lambda: model(ids_t, use_cache=True, logits_to_keep=1))),
        Contender("transformers", "torch fallback, generate()", "generate", recorded(gen)),
        Contender("transformers", "torch fallback, generate()", "prefill16",
                  recorded(lambda: model(prompt_t, use_cache=True, logits_to_keep=1))),
    ]
    return contenders, recorder


# ---------------------------------------------------------------------------------------------
# the machine


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
    for dist in ("jax", "jaxlib", "flax", "mamba2-jax", "torch", "transformers", "numpy", "ssm-equiv"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def wait_until_idle(max_wait: float, threshold: float) -> float:
    """Wait (up to max_wait s) for the 1-minute load average to drop below threshold; return it."""
    deadline = time.time() + max_wait
    while os.getloadavg()[0] >= threshold and time.time() < deadline:
        time.sleep(10)
    return os.getloadavg()[0]


# ---------------------------------------------------------------------------------------------
# run, summarise, print


def run(contenders: list[Contender], rounds: int, log) -> None:
    for c in contenders:
        log(f"  warm-up {c.impl} / {c.variant} / {c.kind}")
        c.first_s = _wall(c.fn)  # compiles (JAX) / allocates (torch): the one warm-up call
    for r in range(rounds):
        order = contenders if r % 2 == 0 else contenders[::-1]
        for c in order:
            c.runs.append(_wall(c.fn))
        log(f"  round {r + 1}/{rounds} done (load {os.getloadavg()[0]:.2f})")


def summarise(contenders: list[Contender]) -> list[dict]:
    rows = []
    by_key = {(c.impl, c.variant, c.kind): c for c in contenders}
    for c in contenders:
        row = {"impl": c.impl, "variant": c.variant, "kind": c.kind, "median_s": c.median_s,
               "runs_s": c.runs, "first_call_s": c.first_s, "compile_s": max(c.first_s - c.median_s, 0.0)}
        if c.kind == "prefill":
            row["tokens_per_s"] = PREFILL_LEN / c.median_s
        elif c.kind == "generate":
            pre = by_key[(c.impl, c.variant, "prefill16")]
            ms_per_token = lambda gen_s, pre_s: 1e3 * (gen_s - pre_s) / NEW_TOKENS  # noqa: E731
            row["ms_per_token"] = ms_per_token(c.median_s, pre.median_s)
            row["ms_per_token_runs"] = [ms_per_token(g, p) for g, p in zip(c.runs, pre.runs, strict=True)]
            row["prefill16_s"] = pre.median_s
            row["prefill16_runs_s"] = pre.runs
        else:
            continue
        rows.append(row)
    return rows


def ratios(rows: list[dict]) -> dict:
    def pick(impl, kind):
        return [r for r in rows if r["impl"] == impl and r["kind"] == kind]

    def per_round(ours_runs, other_runs, faster):  # both runs of one round, seconds apart
        pairs = zip(ours_runs, other_runs, strict=True)
        return [(t / u) if faster else (u / t) for u, t in pairs]

    out = {}
    others = ([(f"mamba2-jax {mj['variant']}", mj, TARGETS["prefill_vs_mamba2_jax"])
               for mj in pick("mamba2-jax", "prefill")]
              + [("transformers", pick("transformers", "prefill")[0], TARGETS["prefill_vs_transformers"])])
    for o in pick("builtin", "prefill"):  # tokens/s ratio = the other's time / ours
        for name, other, target in others:
            out[f"prefill {o['variant']} / {name}"] = (
                o["tokens_per_s"] / other["tokens_per_s"], per_round(o["runs_s"], other["runs_s"], True),
                target, ">=")
    ours_d = pick("builtin", "generate")[0]
    for impl, target, sense in (("transformers", TARGETS["decode_vs_transformers"], "<="),
                                ("mamba2-jax", None, "")):
        other = pick(impl, "generate")[0]
        out[f"decode ms/token / {impl}"] = (
            ours_d["ms_per_token"] / other["ms_per_token"],
            per_round(ours_d["ms_per_token_runs"], other["ms_per_token_runs"], False), target, sense)

    def met(r, t, sense):
        return None if t is None else (r >= t if sense == ">=" else r <= t)

    # the verdict is on the ratio of the medians; the per-round ratios (both runs of one round, seconds
    # apart) show how far the machine's drift from round to round moves it
    return {k: {"ratio": r, "per_round": pr, "target": t, "sense": s, "met": met(r, t, s)}
            for k, (r, pr, t, s) in out.items()}


def print_report(report: dict) -> None:
    m = report["machine"]
    print(f"\nMamba-2 130m-shaped, float32, batch 1 | {m['cpu']} x {m['cores']} cores | load "
          f"{m['load_before'][0]:.2f} before, {m['load_after'][0]:.2f} after (1-min)")
    print(f"versions: {report['versions']}")
    print(f"threads: torch {m['torch_threads']}, XLA_FLAGS={m['xla_flags']!r}; "
          f"jax_default_matmul_precision={report['jax_default_matmul_precision']!r}; "
          f"transformers path: {report['transformers_path']}")
    print(f"\n{'implementation':<14} {'variant':<34} {'prefill L=512':>14} {'decode':>12} {'compile':>9}"
          "  timed runs")
    for r in report["rows"]:
        fig = (f"{r['tokens_per_s']:9.1f} tok/s" if "tokens_per_s" in r else " " * 14)
        dec = (f"{r['ms_per_token']:7.1f} ms/tok" if "ms_per_token" in r else " " * 12)
        runs = ", ".join(f"{x:.3f}" for x in r["runs_s"])
        print(f"{r['impl']:<14} {r['variant']:<34} {fig:>14} {dec:>12} {r['compile_s']:8.1f}s  [{runs}] s")
    print("\nratios (this port / other):")
    for k, v in report["ratios"].items():
        verdict = "met" if v["met"] else "NOT met"
        tgt = "" if v["target"] is None else f"target {v['sense']} {v['target']}: {verdict}"
        pr = sorted(v["per_round"])
        spread = f"(rounds {pr[0]:.2f}-{pr[-1]:.2f}x, median {statistics.median(pr):.2f}x)"
        print(f"  {k:<62} {v['ratio']:6.2f}x  {spread:<34} {tgt}")
    p, c = report["peaks"], report["ceilings"]
    print(f"\nceiling: measured fp32 matmul {p['xla_matmul_gflops']:.0f} GFLOP/s (XLA), "
          f"{p['torch_matmul_gflops']:.0f} GFLOP/s (torch) on {p['matmul_shape']}; the projections cost "
          f"{c['projection_mflop_per_token']:.0f} MFLOP/token, so no float32 prefill exceeds "
          f"{c['prefill_tokens_per_s_ceiling_projections_only']:.0f} tok/s here; with the SSD's own matmuls "
          f"{c['prefill_tokens_per_s_ceiling_chunk256']:.0f} tok/s (chunk 256), "
          f"{c['prefill_tokens_per_s_ceiling_chunk64']:.0f} tok/s (chunk 64).")
    print(f"decode floor: a step reads {c['decode_weight_mb_per_token']:.0f} MB of float32 weights; at the "
          f"measured {p['matvec_read_gbps']:.1f} GB/s matvec read bandwidth that is "
          f"{c['decode_ms_per_token_floor']:.1f} ms/token.")
    tf = next(r["tokens_per_s"] for r in report["rows"]
              if r["impl"] == "transformers" and r["kind"] == "prefill")
    need = TARGETS["prefill_vs_transformers"] * tf
    if need > c["prefill_tokens_per_s_ceiling_projections_only"]:
        print(f"note: the prefill target of {TARGETS['prefill_vs_transformers']}x transformers needs "
              f"{need:.0f} tok/s, above this machine's float32 ceiling: unreachable here by any float32 "
              "implementation.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 timed rounds instead of 5")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (median reported; >= 3)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                    help="where the 130m checkpoint is cached")
    ap.add_argument("--wait-idle", type=float, default=0.0,
                    help="wait up to this many seconds for the 1-min load average to fall below --idle-load")
    ap.add_argument("--idle-load", type=float, default=0.5)
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    if rounds < 3:
        ap.error(f"--rounds: expected >= 3 (a median of fewer is noise), got {rounds}")
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    log(f"checkpoint: {build_bench_checkpoint(args.cache_dir)}")
    if args.wait_idle:
        log(f"load {wait_until_idle(args.wait_idle, args.idle_load):.2f} after waiting for idle")
    import torch

    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    prefill_ids = jnp.asarray(rng.integers(0, BENCH_130M["vocab_size"], (1, PREFILL_LEN)), jnp.int32)
    prompt = jnp.asarray(rng.integers(0, BENCH_130M["vocab_size"], (1, PROMPT_LEN)), jnp.int32)
    log("measuring matmul throughput and bandwidth")
    peaks = measure_peaks(args.quick)
    contenders = []
    with jax.default_matmul_precision("highest"):  # the built-in port's default; a no-op for fp32 on CPU
        log("loading: built-in port, mamba2-jax, transformers")
        contenders += builtin_contenders(args.cache_dir, prefill_ids, prompt)
        contenders += mamba2_jax_contenders(args.cache_dir, prefill_ids, prompt)
        tf, recorder = transformers_contenders(args.cache_dir, prefill_ids, prompt)
        contenders += tf
        gc.collect()
        run(contenders, rounds, log)
        precision = jax.config.jax_default_matmul_precision
    path = {k: v["ran"] for k, v in recorder.record().items()}
    report = {
        "model": {"shape": "mamba2-130m", "config": BENCH_130M, "dtype": "float32",
                  "weights": "random (transformers init, seed 0)"},
        "method": {"prefill_len": PREFILL_LEN, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "batch": 1,
                   "rounds": rounds, "statistic": "median over interleaved rounds after one warm-up call",
                   "decode_ms_per_token": "(generate time - prefill time of the 16-token prompt) / 32"},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "platform": platform.platform(),
                    "load_before": load_before, "load_after": os.getloadavg()},
        "versions": versions(), "jax_default_matmul_precision": precision,
        "transformers_path": path, "transformers_dispatch": recorder.record(),
        "peaks": peaks, "ceilings": ceilings(peaks), "rows": summarise(contenders),
    }
    report["ratios"] = ratios(report["rows"])
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
