"""The layer-streamed diff measured on a checkpoint bigger than this machine can verify in memory:
a Mamba-2 2.7b-shaped float32 checkpoint (d_model 2560, 64 layers, state 128, head dim 64, expand 2,
one group, vocab 50280, chunk 256: 10.8 GB of weights), random but sensible, written
deterministically in a sharded safetensors layout with its index.

    python -m equiv_reference.mamba2.stream_bench [--dir /tmp/ssm-2p7b] [--modes accumulated,isolated]
        [--decode-steps 16] [--keep] [--results FILE]

writes the checkpoint (unless it is there already), runs `equiv diff DIR --stream --seq-len 64
--batch 1` once per mode (as a child process, as a user would), then once more in accumulated mode
with `--decode-steps N` when N > 0, and prints the wall time and the peak resident memory of each
(the report's settings.peak_rss_bytes); docs/streaming.md records them. The checkpoint is deleted
afterwards unless --keep: it is 10.8 GB.

Not a test: a run takes minutes per mode.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

SHAPE = dict(vocab_size=50280, hidden_size=2560, num_hidden_layers=64, state_size=128, head_dim=64,
             num_heads=80, expand=2, n_groups=1, conv_kernel=4, chunk_size=256, layer_norm_epsilon=1e-5,
             residual_in_fp32=True, use_conv_bias=True, use_bias=False, tie_word_embeddings=True,
             time_step_limit=(0.0, float("inf")), bos_token_id=0, eos_token_id=0, pad_token_id=0)
SEED = 2700
SHARD_BYTES = 2 * 10**9  # about what save_pretrained's default max_shard_size writes


def _specs(cfg: dict) -> list[tuple[str, tuple]]:
    """Every tensor of a transformers Mamba-2 checkpoint, in file order, with its shape."""
    d, v, e = cfg["hidden_size"], cfg["vocab_size"], cfg["expand"] * cfg["hidden_size"]
    h, g, n, k = cfg["num_heads"], cfg["n_groups"], cfg["state_size"], cfg["conv_kernel"]
    conv_dim = e + 2 * g * n
    specs = [("backbone.embeddings.weight", (v, d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"backbone.layers.{i}."
        specs += [(p + "norm.weight", (d,)), (p + "mixer.in_proj.weight", (2 * e + 2 * g * n + h, d)),
                  (p + "mixer.conv1d.weight", (conv_dim, 1, k)), (p + "mixer.conv1d.bias", (conv_dim,)),
                  (p + "mixer.A_log", (h,)), (p + "mixer.dt_bias", (h,)), (p + "mixer.D", (h,)),
                  (p + "mixer.norm.weight", (e,)), (p + "mixer.out_proj.weight", (d, e))]
    return specs + [("backbone.norm_f.weight", (d,))]


def _tensor(name: str, shape: tuple, cfg: dict) -> np.ndarray:
    """One tensor, from a seed of its own name (so shards can be written in any order). Sensible
    scales: unit-RMS activations into every projection, the residual stream growing slowly
    (out_proj scaled by 1/sqrt(layers), as rescale_prenorm_residual does), logits spread by a few
    units, A and dt over the ranges trained Mamba-2 models have."""
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
    d, e, layers = cfg["hidden_size"], cfg["expand"] * cfg["hidden_size"], cfg["num_hidden_layers"]
    normal = lambda std: (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))  # noqa: E731
    if name.endswith("embeddings.weight"):
        return normal(4.0 / math.sqrt(d))  # tied head: logits std ~4
    if name.endswith(("norm.weight", "norm_f.weight")):
        return 1.0 + normal(0.1)
    if name.endswith("in_proj.weight"):
        return normal(1.0 / math.sqrt(d))
    if name.endswith("out_proj.weight"):
        return normal(1.0 / math.sqrt(e * layers))
    if name.endswith("conv1d.weight"):
        return normal(0.5)
    if name.endswith("conv1d.bias"):
        return normal(0.2)
    if name.endswith("A_log"):  # A = -exp(A_log) in [-16, -1]
        return rng.uniform(0.0, math.log(16.0), shape).astype(np.float32)
    if name.endswith("dt_bias"):  # softplus(dt) over ~1e-3 .. 1
        return rng.uniform(-6.0, 0.5, shape).astype(np.float32)
    if name.endswith("mixer.D"):
        return rng.uniform(-1.0, 2.0, shape).astype(np.float32)
    raise ValueError(f"no rule for {name}")


def _write_shard(path: Path, names: list[tuple[str, tuple]], cfg: dict) -> None:
    """A safetensors file written tensor by tensor (the header first, from the shapes), so only one
    tensor is ever in memory."""
    header, offset = {}, 0
    for name, shape in sorted(names):
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, shape in sorted(names):
            f.write(_tensor(name, shape, cfg).tobytes())


def write_checkpoint(out: Path) -> int:
    """config.json (transformers' own Mamba2Config.save_pretrained), the shards and their index.
    Returns the bytes of weights."""
    from equiv_reference.mamba2.dispatch import import_modeling_mamba2

    out.mkdir(parents=True, exist_ok=True)
    import_modeling_mamba2().Mamba2Config(**SHAPE).save_pretrained(out)
    shards, current, size = [], [], 0
    for name, shape in _specs(SHAPE):
        nbytes = 4 * math.prod(shape)
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for j, names in enumerate(shards):
        file = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(out / file, names, SHAPE)
        for name, shape in names:
            weight_map[name] = file
            total += 4 * math.prod(shape)
        print(f"stream_bench: wrote {file} ({len(names)} tensors)", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def run_diff(checkpoint: Path, mode: str, decode_steps: int, out: Path) -> dict:
    """One `equiv diff --stream` as a child process: its exit code, wall time, peak RSS, verdict."""
    cmd = [sys.executable, "-m", "equiv.cli", "diff", str(checkpoint), "--stream", "--seq-len", "64",
           "--batch", "1", "--mode", mode, "--out", str(out)]
    if decode_steps:
        cmd += ["--decode-steps", str(decode_steps)]
    print("stream_bench: $ " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False)
    wall = time.perf_counter() - t0
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    decode = json.loads((out / "decode.json").read_text()) if (out / "decode.json").exists() else None
    return {"command": "equiv " + " ".join(cmd[3:]), "mode": mode, "decode_steps": decode_steps,
            "exit_code": proc.returncode, "wall_seconds": round(wall, 1),
            "peak_rss_bytes": report.get("settings", {}).get("peak_rss_bytes"),
            "verdict": report.get("verdict"), "summary": report.get("summary"),
            "decode": None if decode is None else {"verdict": decode["verdict"], "reason": decode["reason"]},
            "stages": report.get("settings", {}).get("streamed")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ssm-2p7b"), help="where the checkpoint goes")
    ap.add_argument("--modes", default="accumulated,isolated")
    ap.add_argument("--decode-steps", type=int, default=16,
                    help="then one more accumulated run with this many teacher-forced decode steps (0: none)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    ap.add_argument("--results", type=Path, default=None, help="write the measurements here as JSON")
    args = ap.parse_args(argv)
    if not (args.dir / "model.safetensors.index.json").exists():
        t0 = time.perf_counter()
        total = write_checkpoint(args.dir)
        print(f"stream_bench: {total / 1e9:.1f} GB of weights written in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
    runs = [(mode, 0) for mode in args.modes.split(",") if mode]
    if args.decode_steps:
        runs.append(("accumulated", args.decode_steps))
    results = []
    try:
        for mode, steps in runs:
            out = args.dir.parent / f"{args.dir.name}-report-{mode}{f'-decode{steps}' if steps else ''}"
            results.append(run_diff(args.dir, mode, steps, out))
            r = results[-1]
            rss = r["peak_rss_bytes"]
            print(f"stream_bench: {mode}{f' + decode {steps}' if steps else ''}: exit {r['exit_code']}, "
                  f"{r['wall_seconds']:.0f} s, peak RSS {rss / 1e9 if rss else float('nan'):.2f} GB, "
                  f"{r['verdict']}", file=sys.stderr, flush=True)
            if args.results:
                args.results.write_text(json.dumps(results, indent=1) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    print(json.dumps(results, indent=1))
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
