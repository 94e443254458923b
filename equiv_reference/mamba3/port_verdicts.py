"""Layer-wise and decode verdicts of a Mamba-3 port on the Mamba-3 fixtures, against the float64
oracle, with the budget's float32 reference chosen on the command line:

    python -m equiv_reference.mamba3.port_verdicts --port equiv.mamba3.mamba3_jax_adapter:Mamba3JaxPort \\
        [--reference oracle32|mamba_ssm] [--fixture NAME ...] [--seq-len 40] [--seed 0] [--json PATH]

`oracle32` is equiv/mamba3/oracle.py run in float32 (an independent float32 computation, any
machine). `mamba_ssm` is the kernel reference (equiv_reference/mamba3/runner.py): on a GPU as
shipped; on CPU (TRITON_INTERPRET=1 in the environment) through the interpreter with its recorded
adaptations, so there it is the kernels' algorithm in float32, not their GPU numerics. What the
kernels computed on a GPU is replayed by the main job's own check instead (`equiv check --port
SPEC --fixture NAME`, rows "<fixture>@mamba_ssm"): `record_kernels` records that check's inputs,
not this script's.

Until the Mamba-3 family is registered, `equiv diff CHECKPOINT --port module:attr --reference
equiv_reference.mamba3.references:oracle` gives the same layer-wise table; this adds the decode
match (greedy, batch 1: mamba_ssm takes no mask) at prompt lengths straddling the port's
decode_lengths, and prints one line per fixture with every tap's budget ratio in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from equiv.decode import match_greedy
from equiv.layerwise import run_layerwise
from equiv.ports import resolve_port

FIXTURES = ("mamba3-tiny-siso", "mamba3-tiny-siso-rope1-outnorm", "mamba3-tiny-mimo")
NEW_TOKENS = 16


def load_reference(kind: str, path: Path):
    from equiv_reference.mamba3.oracle_runner import Mamba3OracleRunner

    if kind == "oracle32":
        return Mamba3OracleRunner(path, "float32")
    import os

    from equiv_reference.mamba3.runner import Mamba3SsmRunner

    cpu = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return Mamba3SsmRunner(path, "float32", device="cpu" if cpu else "cuda", interpreter_adaptations=cpu)


def prompt_lengths(decode_lengths) -> list[int]:
    return sorted({max(1, n + d) for n in decode_lengths for d in (-1, 0, 1)})


def layerwise_ids(vocab_size: int, seq_len: int, seed: int) -> np.ndarray:
    """The layer-wise input (1, seq_len): batch 1, since mamba_ssm takes no mask."""
    return np.random.default_rng(seed).integers(0, vocab_size, (1, seq_len)).astype(np.int32)


def decode_prompts(vocab_size: int, decode_lengths, seed: int) -> list[np.ndarray]:
    """One (1, P) prompt per P of `prompt_lengths`, drawn in that order."""
    rng = np.random.default_rng(seed + 1)
    return [rng.integers(0, vocab_size, (1, P)).astype(np.int32) for P in prompt_lengths(decode_lengths)]


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def verdicts(port_spec: str, reference: str, fixture: Path, seq_len: int, seed: int) -> dict:
    from equiv_reference.mamba3.oracle_runner import Mamba3OracleRunner

    model = resolve_port(port_spec).load(fixture, "float32")
    ref, oracle = load_reference(reference, fixture), Mamba3OracleRunner(fixture, "float64")
    lw = run_layerwise(model, ref, oracle, layerwise_ids(model.vocab_size, seq_len, seed), None, seed=seed)
    out = {"fixture": fixture.name, "reference": reference, "layerwise": lw.verdict, "counts": lw.counts,
           "first_divergence": None if lw.first_divergence is None else
           {"tap": lw.first_divergence.tap, "ratio": _num(lw.first_divergence.ratio)},
           "taps": {t.name: {"ratio": _num(t.ratio), "ratio_max": _num(t.ratio_max),
                             "err_port": _num(t.err_port), "err_ref": _num(t.err_ref), "verdict": t.verdict}
                    for t in lw.taps},
           "decode": []}
    for prompt in decode_prompts(model.vocab_size, model.decode_lengths, seed):
        d = match_greedy(model, ref, oracle, prompt, None, NEW_TOKENS)
        out["decode"].append({"prompt_len": prompt.shape[1], "verdict": d.verdict,
                              "matched": d.matched_steps[0], "of": d.total_steps[0],
                              "logits_ratio": _num(d.logits.ratio),
                              "reference_cached_ratio": _num(d.reference_consistency.ratio),
                              "classes": [m.classification for m in d.mismatches]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", required=True, help="module:attr of a Port")
    ap.add_argument("--reference", choices=("oracle32", "mamba_ssm"), default="oracle32")
    ap.add_argument("--fixture", action="append", dest="fixtures", help="fixture name (default: all three)")
    ap.add_argument("--fixtures-root", type=Path, default=Path("fixtures"))
    ap.add_argument("--seq-len", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = []
    for name in args.fixtures or FIXTURES:
        try:
            row = verdicts(args.port, args.reference, args.fixtures_root / name, args.seq_len, args.seed)
        except Exception as e:  # noqa: BLE001 - one fixture's failure is a row, not the end of the run
            row = {"fixture": name, "reference": args.reference, "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        if "error" in row:
            print(f"{name:32s} {args.reference:9s} NOT RUN: {row['error']}")
            continue
        first = row["first_divergence"]
        decode = " ".join(f"P{d['prompt_len']}:{d['matched']}/{d['of']}" for d in row["decode"])
        ratios = [d["logits_ratio"] for d in row["decode"] if d["logits_ratio"] is not None]
        print(f"{name:32s} {args.reference:9s} {row['layerwise']:11s} "
              f"first {first['tap'] if first else '-'} ({first['ratio']:.3g}x)" if first else
              f"{name:32s} {args.reference:9s} {row['layerwise']:11s} first -", end="")
        print(f" | decode {decode} | teacher-forced logits {min(ratios):.3g}..{max(ratios):.3g}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
