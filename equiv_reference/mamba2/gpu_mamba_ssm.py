"""GPU section `mamba_ssm` of equiv_reference/mamba2/gpu_run.py: the built-in port against mamba_ssm's
`MambaLMHeadModel` (equiv_reference/mamba2/mamba_ssm_runner.py) on every bundled fixture, through the harness.

- layer-wise diff, accumulated mode, float32, port at matmul precision "highest"; the oracle is the
  registry's float64 oracle for mamba_ssm (transformers' model in float64 on the CPU);
- greedy decode match (equiv.decode.match_greedy: the port's `generate` against mamba_ssm's own
  `generate`, teacher-forced logits by the error budget, mismatches classified), batch 1, 64 new
  tokens, prompt lengths straddling multiples of chunk_size; no eos (as the main job's plan);
- context: the same layer-wise diff against transformers' torch float32 reference (CPU), so
  mamba_ssm's error can be set beside torch's at every tap;
- mamba_ssm's generate with CUDA graphs (cg=True) against cg=False on one prompt.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def _log(msg):
    print(f"[gpu_run {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prompts_for(path: Path, vocab: int, chunk: int) -> list[np.ndarray]:
    """Batch-1 prompts whose lengths straddle chunk boundaries: the trained fixture's recorded code
    prompts (repeated, cut at each length), random ids for the tiny ones."""
    training = path / "training.json"
    if training.is_file():
        text = "".join(json.loads(training.read_text())["prompts"]) * 8
        data = list(text.encode("utf-8"))
        lengths = (chunk - 1, chunk, chunk + 1, 2 * chunk - 1, 2 * chunk, 2 * chunk + 1)
        return [np.asarray([data[:n]], np.int32) for n in lengths]
    rng = np.random.default_rng(1)
    lengths = (chunk - 1, chunk, chunk + 1, 2 * chunk + 1)
    return [rng.integers(0, vocab, (1, n)).astype(np.int32) for n in lengths]


def _taps(result) -> list[dict]:
    return [{"tap": t.name, "verdict": t.verdict, "ratio": t.ratio, "ratio_max": t.ratio_max,
             "err_port": t.err_port, "err_ref": t.err_ref, "raw_diff": t.raw_diff} for t in result.taps]


def _decode_row(d, prompt_len: int) -> dict:
    return {"prompt_len": prompt_len, "verdict": d.verdict, "reason": d.reason,
            "matched": d.matched_steps[0], "steps": d.total_steps[0],
            "mismatches": [m.__dict__ for m in d.mismatches],
            "logits_ratio": d.logits.ratio if d.logits else None,
            "reference_consistency": d.reference_consistency.verdict if d.reference_consistency else None,
            "reference_consistency_ratio": d.reference_consistency.ratio if d.reference_consistency else None,
            "median_reference_margin": d.median_reference_margin}


def cuda_graph_check(path: Path, prompt: np.ndarray, new: int) -> dict:
    """mamba_ssm generate with cg=True vs cg=False: same tokens, margins how close."""
    from equiv_reference.mamba2.mamba_ssm_runner import MambaSsmRunner

    plain = MambaSsmRunner(path, "float32").generate(prompt, None, new)
    graphed = MambaSsmRunner(path, "float32", cuda_graphs=True).generate(prompt, None, new)
    return {"fixture": path.name, "prompt_len": int(prompt.shape[1]), "new_tokens": new,
            "tokens_equal": bool(np.array_equal(plain.tokens, graphed.tokens)),
            "max_margin_diff": float(np.nanmax(np.abs(plain.margins - graphed.margins)))}


def mamba_ssm_section(fixtures_root: Path, out: Path | None = None, new_tokens: int = 64,
                      only: list[str] | None = None) -> dict:
    import torch

    from equiv.decode import match_greedy
    from equiv.fixtures import list_fixtures
    from equiv.layerwise import run_layerwise
    from equiv.mamba2.port import Mamba2Port
    from equiv.references import load_reference

    torch.backends.cuda.matmul.allow_tf32 = False  # torch's defaults, stated: the reference's torch
    torch.backends.cudnn.allow_tf32 = False  # matmuls (in_proj, out_proj, lm_head) run full fp32
    names = [n for n in list_fixtures() if n != "golden" and (not only or n in only)]
    names.sort(key=lambda n: n != "trained-bytes")  # the trained checkpoint first: the real test
    report: dict = {"fixtures": {}, "cuda_graphs": None}
    for name in names:
        path = fixtures_root / name
        row: dict = {}
        report["fixtures"][name] = row
        try:
            t0 = time.perf_counter()
            ref = load_reference("mamba_ssm", path, "float32")
            oracle = load_reference("mamba_ssm", path, "float64")  # transformers float64 (registry)
            model = Mamba2Port(precision="highest").load(path)
            cfg = model.cfg
            ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 80)).astype(np.int32)
            r = run_layerwise(model, ref, oracle, ids, None, mode="accumulated")
            worst = max((t.ratio for t in r.taps if t.ratio == t.ratio), default=float("nan"))
            first = r.first_divergence.explanation if r.first_divergence else None
            row["layerwise"] = {"verdict": r.verdict, "counts": r.counts, "worst_ratio": worst,
                                "first_divergence": first, "port_only": r.port_only, "taps": _taps(r)}
            _log(f"{name} layer-wise vs mamba_ssm: {r.verdict}, worst ratio {worst:.3g}; "
                 + (r.first_divergence.explanation if r.first_divergence else "no divergence"))
            # context: transformers' torch fp32 reference error on the same ids (its taps, CPU)
            rt = run_layerwise(model, load_reference("transformers", path, "float32"), oracle, ids, None)
            row["transformers_fp32_reference"] = {"verdict": rt.verdict, "taps": _taps(rt)}
            row["decode"] = []
            for prompt in prompts_for(path, cfg.vocab_size, cfg.chunk_size):
                d = match_greedy(model, ref, oracle, prompt, None, new_tokens, None)
                row["decode"].append(_decode_row(d, int(prompt.shape[1])))
                _log(f"{name} decode P={prompt.shape[1]}: {d.verdict}: {d.reason}")
            row["reference_provenance"] = ref.provenance()
            keys = ("reference", "dtype", "oracle_for", "versions")
            row["oracle"] = {k: oracle.provenance()[k] for k in keys}
            row["seconds"] = round(time.perf_counter() - t0, 1)
        except Exception as e:  # noqa: BLE001 - one fixture's failure must not lose the others
            import traceback

            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc()
            _log(f"{name} failed: {row['error']}")
        if out is not None:
            (out / "mamba-ssm-report.json").write_text(json.dumps(report, indent=1, default=str))
    try:
        path = fixtures_root / "trained-bytes"
        report["cuda_graphs"] = cuda_graph_check(path, prompts_for(path, 264, 64)[2], new_tokens)
        _log(f"cuda graphs: {report['cuda_graphs']}")
    except Exception as e:  # noqa: BLE001
        report["cuda_graphs"] = {"error": f"{type(e).__name__}: {e}"}
        _log(f"cuda graphs check failed: {report['cuda_graphs']['error']}")
    if out is not None:
        (out / "mamba-ssm-report.json").write_text(json.dumps(report, indent=1, default=str))
    return report
