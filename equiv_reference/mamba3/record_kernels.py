"""Record mamba_ssm's Mamba-3 kernels on a GPU, so a machine without one can replay them:

    python -m equiv_reference.mamba3.record_kernels [--out fixtures/golden] [--fixture NAME ...] \\
        [--torch-step]

For each Mamba-3 fixture it runs the main job's own check of that fixture (equiv.check.check_fixture,
the layer-wise diff in both modes and the greedy decode match with unpadded prompts, since Mamba3
takes no attention mask) with the built-in port, the float64 oracle, and as the float32 reference
equiv_reference/mamba3/runner.py (Triton SISO / TileLang MIMO prefill, CuTe decode step) wrapped in
`equiv.golden.RecordingRunner`. Every reference call the check makes is recorded; the calls do not
depend on the port (teacher forcing follows the reference's tokens), so the recording answers the
same check of any port. It writes fixtures/golden/<fixture>/mamba_ssm-float32.{safetensors,json}
(`save_recording`: sorted, no timestamps), which the main job replays as "<fixture>@mamba_ssm"
(Family.recorded_references), and <out>/mamba3-kernels-generator.json: device, versions, which
kernels ran and how often, the configs Triton's autotuner chose, and the GPU run's own verdict of
the built-in port against the kernels.

Without CUDA it stops in one line, unless TRITON_INTERPRET=1 is set: then it records the
interpreter's adapted run under the name mamba_ssm-interpreter-float32, to test this script, never
as a GPU recording.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from equiv.golden import RecordingRunner, save_recording
from equiv_reference.mamba3 import kernels
from equiv_reference.mamba3.port_verdicts import FIXTURES


def autotuned_configs(code) -> dict[str, list[str]]:
    """{kernel: [the config Triton's autotuner chose, per key]}: launch shapes can change the order
    of a kernel's float32 sums, so a recording names the ones it ran with."""
    from triton.runtime.autotuner import Autotuner

    out = {}
    for mod in code.modules.values():
        for attr, value in vars(mod).items():
            if isinstance(value, Autotuner) and value.cache:
                out[f"{mod.__name__}.{attr}"] = sorted({str(c) for c in value.cache.values()})
    return out


def record(path: Path, out_root: Path, device: str, torch_step: bool = False, progress=print) -> dict:
    """Record one fixture; returns its provenance and the check's verdict of the built-in port."""
    from equiv.check import check_fixture, reference_loader
    from equiv.families import family
    from equiv.ports import resolve_port
    from equiv_reference.mamba3.runner import Mamba3SsmRunner

    fam = family("mamba3")
    oracle = reference_loader(fam, False, out_root)  # live: the family's float64 oracle
    runner = Mamba3SsmRunner(path, "float32", device=device, interpreter_adaptations=device == "cpu",
                             torch_step_fallback=torch_step)
    rec = RecordingRunner(runner)
    load_ref = lambda p, dtype: rec if dtype == "float32" else oracle(p, dtype)  # noqa: E731
    outcome = check_fixture(path.name, path, resolve_port("builtin", fam), load_ref, progress, unpadded=True)
    if outcome.error:
        raise RuntimeError(outcome.error)
    name = "mamba_ssm-float32" if device != "cpu" else "mamba_ssm-interpreter-float32"
    target = out_root / path.name
    target.mkdir(parents=True, exist_ok=True)
    save_recording(rec, target / name)
    acc = outcome.layerwise["accumulated"]
    return {"provenance": runner.provenance(), "recorded_calls": len(rec.records),
            "builtin_port_verdict": {
                "verdict": outcome.verdict,
                "worst_ratio": {mode: max((t.ratio for t in lw.taps if t.ratio == t.ratio), default=None)
                                for mode, lw in outcome.layerwise.items()},
                "first_divergence": None if acc.first_divergence is None else acc.first_divergence.tap,
                "decode_matched": [(sum(d.matched_steps), sum(d.total_steps)) for d in outcome.decode]}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("fixtures/golden"))
    ap.add_argument("--fixtures-root", type=Path, default=Path("fixtures"))
    ap.add_argument("--fixture", action="append", dest="fixtures", help="fixture name (default: all three)")
    ap.add_argument("--torch-step", action="store_true",
                    help="where the CuTe step cannot import, decode through mamba_ssm's torch reference of "
                         "it (recorded in the provenance); without it decode fails naming the CuTe kernel")
    args = ap.parse_args(argv)
    if torch.cuda.is_available():
        device = "cuda"
    elif kernels.interpreted():
        device = "cpu"
    else:
        print("record_kernels: expected a CUDA GPU (mamba_ssm's Mamba-3 kernels), got none; "
              "TRITON_INTERPRET=1 records the CPU interpreter's run instead (for testing only)",
              file=sys.stderr)
        return 2
    meta = {"device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "torch_step": args.torch_step, "fixtures": {}}
    failed = 0
    for name in args.fixtures or FIXTURES:
        t0 = time.perf_counter()
        elapsed = lambda t0=t0: time.perf_counter() - t0  # noqa: E731
        print(f"{name}: recording (the first fixture also compiles and autotunes the kernels)", flush=True)
        try:
            got = record(args.fixtures_root / name, args.out, device, torch_step=args.torch_step,
                         progress=lambda m, elapsed=elapsed: print(f"  {m} ({elapsed():.0f} s)", flush=True))
        except Exception as e:  # noqa: BLE001 - one fixture's failure is reported, the rest still run
            failed += 1
            meta["fixtures"][name] = {"error": f"{type(e).__name__}: {e}"[:400]}
            print(f"{name}: NOT RECORDED: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        prov = got["provenance"]
        meta["fixtures"][name] = {"code_paths": prov["code_paths"], "versions": prov["versions"],
                                  "interpreter_adaptations": prov["interpreter_adaptations"],
                                  "recorded_calls": got["recorded_calls"], "seconds": round(elapsed(), 1),
                                  "builtin_port_verdict": got["builtin_port_verdict"]}
        calls = {k: v["calls"] for k, v in prov["code_paths"].items()}
        print(f"{name}: recorded {got['recorded_calls']} calls in {elapsed():.0f} s ({calls}); "
              f"built-in port vs these kernels: {got['builtin_port_verdict']}", flush=True)
    meta["autotuned"] = autotuned_configs(kernels.load_mamba3())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mamba3-kernels-generator.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
