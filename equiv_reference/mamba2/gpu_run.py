"""GPU run (`nox -s gpu`, or `python -m equiv_reference.mamba2.gpu_run --out DIR`): what CI cannot do.

1. SSD equivalence on the GPU: equiv.mamba2.ssd.ssd_chunked (JAX, matmul precision "highest" and JAX's GPU
   default, which runs float32 matmuls as TF32: docs/porting-bugs.md #11) and mamba_ssm's Triton
   `mamba_chunk_scan_combined` (when importable) against the float64 oracle, by the error budget
   with transformers' torch chunk scan (fp32, TF32 off) as the reference.
2. The built-in port on the GPU against the torch reference on every bundled fixture (layer-wise,
   both modes), with highest and default precision.
3. Speed: prefill tokens/s (L=2048, batch 1) and decode ms/token (16-token prompt, 64 new tokens,
   greedy, whole loop on device) of the built-in port on 130m- and 2.7b-shaped random models,
   float32 and bfloat16.
4. mamba_ssm (equiv_reference/mamba2/gpu_mamba_ssm.py): the built-in port against mamba_ssm's MambaLMHeadModel
   (layer-wise, accumulated, float32) and greedy decode against mamba_ssm's generate, every fixture;
   also written alone to mamba-ssm-report.json.

Writes gpu-report.json and gpu-report.md to --out. Prints progress as it goes.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def log(msg):
    print(f"[gpu_run {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_triton_chunk_scan():
    """mamba_ssm's Triton `mamba_chunk_scan_combined`, imported without mamba_ssm/__init__.py (which
    needs the CUDA extension we do not build). Call only after transformers' Mamba-2 module was
    imported with the kernel packages hidden, so the torch reference stays the torch fallback."""
    import importlib
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None:
        raise ImportError("mamba_ssm is not installed")
    if "mamba_ssm" not in sys.modules:
        bare = types.ModuleType("mamba_ssm")
        bare.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = bare
    return importlib.import_module("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined


def ssd_section(quick: bool) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch

    from equiv.compare import compare_tap
    from equiv.mamba2.ssd import ssd_chunked
    from equiv_reference.mamba2 import ssd_oracles
    from equiv_reference.mamba2.dispatch import import_modeling_mamba2
    from equiv_reference.provenance import bound_implementation

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    mm2 = import_modeling_mamba2()
    torch_scan = getattr(mm2.mamba2_chunk_scan, "__wrapped__", mm2.mamba2_chunk_scan)
    log(
        f"transformers mamba2_chunk_scan bound to: {bound_implementation(mm2.mamba2_chunk_scan)}; "
        "using its torch body"
    )
    try:
        triton_scan = load_triton_chunk_scan()
    except Exception as e:  # noqa: BLE001 - report why the kernel path is absent
        triton_scan = None
        log(f"mamba_ssm Triton kernels unavailable: {type(e).__name__}: {e}")
    shapes = [
        dict(b=1, l=1000, h=8, p=32, n=32, g=1, chunk=256),
        dict(b=1, l=2048, h=24, p=64, n=128, g=1, chunk=256),
        dict(b=2, l=777, h=16, p=64, n=64, g=4, chunk=128),
    ]
    rows = []
    cuda = lambda a: torch.as_tensor(a).cuda()  # noqa: E731
    for s in shapes[:2] if quick else shapes:
        rng = np.random.default_rng(0)
        b, l, h, p, n, g = (s[k] for k in "blhpng")
        x = rng.standard_normal((b, l, h, p)).astype(np.float32)
        dt = rng.uniform(-2, 2, (b, l, h)).astype(np.float32)
        A = -rng.uniform(1, 16, h).astype(np.float32)
        B = rng.standard_normal((b, l, g, n)).astype(np.float32)
        C = rng.standard_normal((b, l, g, n)).astype(np.float32)
        D = rng.standard_normal(h).astype(np.float32)
        dt_bias = rng.uniform(-1, 1, h).astype(np.float32)
        oracle = ssd_oracles.ssd_oracle_fp64(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True)[0]
        ref = (
            torch_scan(
                cuda(x),
                cuda(dt),
                cuda(A),
                cuda(B),
                cuda(C),
                s["chunk"],
                D=cuda(D),
                dt_bias=cuda(dt_bias),
                dt_softplus=True,
            )
            .float()
            .cpu()
            .numpy()
        )
        entry = {"shape": s, "reference": "transformers mamba2_chunk_scan torch body, CUDA fp32, TF32 off"}
        for prec in ("highest", "default"):
            f = jax.jit(
                lambda x, dt, A, B, C, D, db, chunk=s["chunk"]: ssd_chunked(
                    x, dt, A, B, C, chunk, D=D, dt_bias=db, dt_softplus=True
                )
            )
            with jax.default_matmul_precision(None if prec == "default" else prec):
                y = np.asarray(f(*(jnp.asarray(v) for v in (x, dt, A, B, C, D, dt_bias))))
            entry[f"equiv_jax_{prec}"] = compare_tap("ssd", y, ref, oracle).to_dict()
        if triton_scan is not None:
            y = (
                triton_scan(
                    cuda(x),
                    cuda(dt),
                    cuda(A),
                    cuda(B),
                    cuda(C),
                    s["chunk"],
                    D=cuda(D),
                    dt_bias=cuda(dt_bias),
                    dt_softplus=True,
                )
                .float()
                .cpu()
                .numpy()
            )
            entry["mamba_ssm_triton"] = compare_tap("ssd", y, ref, oracle).to_dict()
        rows.append(entry)
        log(
            f"SSD {s}: "
            + ", ".join(
                f"{k} ratio {v['ratio']:.2f} (max {v['ratio_max']:.2f}) {v['verdict']}"
                for k, v in entry.items()
                if isinstance(v, dict) and "ratio" in v
            )
        )
    return rows


def model_section(fixtures_root: Path) -> list[dict]:
    import jax

    from equiv.families import family_of_checkpoint, import_attr
    from equiv.fixtures import list_fixtures
    from equiv.layerwise import run_layerwise
    from equiv.references import load_reference

    rows = []
    for name in list_fixtures():
        path = fixtures_root / name
        if name == "golden" or not (path / "config.json").is_file():
            continue
        fam = family_of_checkpoint(path)  # each family's own port, against its default reference
        if fam.name not in ("mamba2", "mamba1"):
            continue
        port_class = import_attr(fam.ports["builtin"], f"{fam.title} port")
        ref, oracle = (
            load_reference(fam.default_reference, path, "float32", family=fam),
            load_reference(fam.default_reference, path, "float64", family=fam),
        )
        cfg_vocab = port_class().load(path).vocab_size
        ids = np.random.default_rng(0).integers(0, cfg_vocab, (2, 80)).astype(np.int32)
        for prec in ("highest", "default"):
            model = port_class(precision=prec).load(path)
            for mode in ("accumulated", "isolated"):
                r = run_layerwise(model, ref, oracle, ids, None, mode=mode)
                worst = max((t.ratio for t in r.taps if t.ratio == t.ratio), default=float("nan"))
                rows.append(
                    {
                        "fixture": name,
                        "precision": prec,
                        "mode": mode,
                        "verdict": r.verdict,
                        "counts": r.counts,
                        "worst_ratio": worst,
                        "first_divergence": r.first_divergence.explanation if r.first_divergence else None,
                        "device": str(jax.devices()[0]),
                    }
                )
                log(f"{name} {prec} {mode}: {r.verdict} worst ratio {worst:.2f}")
    return rows


def random_params(cfg, dtype, seed=0):
    import jax
    import jax.numpy as jnp

    key = jax.random.PRNGKey(seed)
    dt = jnp.dtype(dtype)

    def nrm(shape, scale):
        nonlocal key
        key, sub = jax.random.split(key)
        return (jax.random.normal(sub, shape, jnp.float32) * scale).astype(dt)

    layers = []
    for _ in range(cfg.n_layers):
        layers.append(
            {
                "norm": jnp.ones((cfg.d_model,), dt),
                "in_proj": nrm((cfg.d_model, cfg.in_proj_dim), cfg.d_model**-0.5),
                "conv_w": nrm((cfg.conv_kernel, cfg.conv_dim), 0.5),
                "conv_b": nrm((cfg.conv_dim,), 0.1),
                "dt_bias": nrm((cfg.n_heads,), 1.0).astype(jnp.float32) - 4.0,
                "A_log": jnp.log(jnp.linspace(1.0, 16.0, cfg.n_heads)).astype(jnp.float32),
                "D": jnp.ones((cfg.n_heads,), jnp.float32),
                "gnorm": jnp.ones((cfg.d_inner,), dt),
                "out_proj": nrm((cfg.d_inner, cfg.d_model), cfg.d_inner**-0.5),
            }
        )
    return {
        "embed": nrm((cfg.vocab_size, cfg.d_model), 0.02),
        "norm_f": jnp.ones((cfg.d_model,), dt),
        "layers": layers,
    }


def speed_section(quick: bool) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from equiv.mamba2.config import Mamba2Config
    from equiv.mamba2.generate import generate, prefill

    shapes = {"130m": dict(d_model=768, n_layers=24), "2.7b": dict(d_model=2560, n_layers=64)}
    rows = []
    for label, shp in shapes.items():
        cfg = Mamba2Config(
            vocab_size=50280,
            d_state=128,
            head_dim=64,
            n_heads=2 * shp["d_model"] // 64,
            n_groups=1,
            chunk_size=256,
            tie_embeddings=True,
            **shp,
        )
        for dtype in ("bfloat16", "float32"):
            params = random_params(cfg, dtype)
            rng = np.random.default_rng(0)
            long = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 2048)), jnp.int32)
            short = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 16)), jnp.int32)
            with jax.default_matmul_precision("highest"):
                t = time.perf_counter()
                jax.block_until_ready(prefill(params, cfg, long))
                compile_prefill = time.perf_counter() - t
                pre = []
                for _ in range(5):
                    t = time.perf_counter()
                    jax.block_until_ready(prefill(params, cfg, long))
                    pre.append(time.perf_counter() - t)
                t = time.perf_counter()
                jax.block_until_ready(generate(params, cfg, short, None, 64)[0])
                compile_gen = time.perf_counter() - t
                gens, shorts = [], []
                for _ in range(5):
                    t = time.perf_counter()
                    jax.block_until_ready(prefill(params, cfg, short))
                    shorts.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    jax.block_until_ready(generate(params, cfg, short, None, 64)[0])
                    gens.append(time.perf_counter() - t)
            row = {
                "model": label,
                "dtype": dtype,
                "prefill_tok_s": 2048 / float(np.median(pre)),
                "decode_ms_per_token": (float(np.median(gens)) - float(np.median(shorts))) / 63 * 1000,
                "compile_prefill_s": compile_prefill,
                "compile_generate_s": compile_gen,
                "matmul_precision": "highest",
            }
            rows.append(row)
            log(f"speed {row}")
            del params
            if quick:
                break
    return rows


def mamba_ssm_section(fixtures_root: Path, out: Path, only: list[str]) -> dict:
    from equiv_reference.mamba2.gpu_mamba_ssm import mamba_ssm_section as section

    return section(fixtures_root, out, only=only or None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-report")
    ap.add_argument("--sections", default="ssd,model,speed,mamba_ssm")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fixtures", default="",
                    help="mamba_ssm section: comma-separated fixture names (default: all)")
    args = ap.parse_args(argv)
    import jax
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "jax": jax.__version__,
        "torch": torch.__version__,
        "devices": [str(d) for d in jax.devices()],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    runs = {
        "ssd": lambda: ssd_section(args.quick),
        "model": lambda: model_section(Path(__file__).resolve().parents[2] / "fixtures"),
        "speed": lambda: speed_section(args.quick),
        "mamba_ssm": lambda: mamba_ssm_section(Path(__file__).resolve().parents[2] / "fixtures", out,
                                               [n for n in args.fixtures.split(",") if n]),
    }
    for name in args.sections.split(","):
        try:  # one failing section must not lose the others' figures
            report[name] = runs[name]()
        except Exception as e:  # noqa: BLE001
            import traceback

            log(f"section {name} failed: {type(e).__name__}: {e}")
            report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        (out / "gpu-report.json").write_text(json.dumps(report, indent=1, default=str))
    log(f"wrote {out / 'gpu-report.json'}")


if __name__ == "__main__":
    main()
