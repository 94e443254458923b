"""Record mamba_ssm's Mamba-3 kernels on a GPU, so a machine without one can replay them:

    python -m equiv_reference.mamba3.record_kernels [--out fixtures/golden] [--fixture NAME ...]

For each Mamba-3 fixture it runs equiv_reference/mamba3/runner.py (Triton SISO / TileLang MIMO prefill,
CuTe decode step) through `equiv.golden.RecordingRunner` on exactly the calls that
`python -m equiv_reference.mamba3.port_verdicts` makes of a reference: the layer-wise forward of
`layerwise_ids` (every tap), and per prompt of `decode_prompts` mamba_ssm's greedy generate, the
teacher-forced step_logits along its tokens and the full-forward logits of the same sequence. It
writes fixtures/golden/<fixture>/mamba_ssm-float32.{safetensors,json} (`save_recording`: sorted, no
timestamps), replayed by `port_verdicts --reference golden` or equiv.golden.GoldenRunner, and
<out>/mamba3-kernels-generator.json (device, versions, which kernels ran and how often).

Without CUDA it stops in one line, unless TRITON_INTERPRET=1 is set: then it records the
interpreter's adapted run under the name mamba_ssm-interpreter-float32, to test this script, never
as a GPU recording.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from equiv.golden import RecordingRunner, save_recording
from equiv_reference.mamba3 import kernels
from equiv_reference.mamba3.port_verdicts import FIXTURES, NEW_TOKENS, decode_prompts, layerwise_ids

SEQ_LEN, SEED = 40, 0  # port_verdicts' defaults: the recording answers exactly its calls


def record(path: Path, out_root: Path, device: str, seq_len: int = SEQ_LEN, seed: int = SEED,
           torch_step: bool = False) -> dict:
    """Record one fixture; returns its provenance (code paths included)."""
    from equiv_reference.mamba3.runner import Mamba3SsmRunner

    runner = Mamba3SsmRunner(path, "float32", device=device, interpreter_adaptations=device == "cpu",
                             torch_step_fallback=torch_step)
    rec = RecordingRunner(runner)
    cfg = runner.cfg
    rec.run(layerwise_ids(cfg.vocab_size, seq_len, seed), None)
    for prompt in decode_prompts(cfg.vocab_size, cfg.decode_lengths, seed):
        gen = rec.generate(prompt, None, NEW_TOKENS, None)
        seq = np.concatenate([prompt, np.asarray(gen.tokens, np.int32)], axis=1)
        rec.step_logits(seq, None, prompt.shape[1])
        rec.logits(seq, None)
    name = "mamba_ssm-float32" if device != "cpu" else "mamba_ssm-interpreter-float32"
    target = out_root / path.name
    target.mkdir(parents=True, exist_ok=True)
    save_recording(rec, target / name)
    return runner.provenance()


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
            "seq_len": SEQ_LEN, "seed": SEED, "new_tokens": NEW_TOKENS, "fixtures": {}}
    failed = 0
    for name in args.fixtures or FIXTURES:
        try:
            prov = record(args.fixtures_root / name, args.out, device, torch_step=args.torch_step)
        except Exception as e:  # noqa: BLE001 - one fixture's failure is reported, the rest still run
            failed += 1
            meta["fixtures"][name] = {"error": f"{type(e).__name__}: {e}"[:400]}
            print(f"{name}: NOT RECORDED: {type(e).__name__}: {str(e)[:200]}")
            continue
        meta["fixtures"][name] = {"code_paths": prov["code_paths"], "versions": prov["versions"],
                                  "interpreter_adaptations": prov["interpreter_adaptations"]}
        calls = {k: v["calls"] for k, v in prov["code_paths"].items()}
        print(f"{name}: recorded ({calls})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mamba3-kernels-generator.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
