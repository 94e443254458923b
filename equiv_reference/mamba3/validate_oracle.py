"""Validate the project's float64 Mamba-3 oracle (equiv/mamba3/oracle.py) against mamba_ssm, and measure
mamba_ssm's Mamba-3 kernels against it, in one command:

    python -m equiv_reference.mamba3.validate_oracle [--json PATH] [--mamba-tests DIR] \
        [--fixtures-root fixtures] [--skip refs,siso,mimo,step,fixtures]

(a) references: the oracle against mamba_ssm's own pure-torch references, all in float64, where
    the two must agree to float64 rounding: `selective_state_update_fused_ref_v2` (the CuTe step's
    reference: one trapezoidal step, SISO and MIMO), `apply_rotary_qk_inference_reference` (the
    rotary step's: angle update and pairwise / rotate-half rotation), and, with `--mamba-tests DIR`
    (a checkout of mamba_ssm's repository), the sequence references its tests define
    (tests/ops/triton/test_mamba3_siso.py: mamba3_siso_step_ref, mamba3_siso_fwd_ref; imported from
    there, never copied). Metric: max |ref - oracle| / max |oracle|; pass below 1e-12.
(b) kernels: each kernel on random inputs of several shapes, and mamba_ssm's whole model on every
    fixture (equiv_reference/mamba3/runner.py), against the float64 oracle. The float32 yardstick is
    the oracle's own code run in float32 on the same inputs: ratio = rms(kernel - oracle64) /
    max(rms(oracle32 - oracle64), 4 ULPs at the RMS scale), the suite's error-budget ratio
    (equiv/compare.py), with the max-error ratio beside it. The SISO kernel reads Q, K, V, Trap, Angles
    (and Z) in bfloat16: its rows also give the ratio against the oracle fed those bfloat16-rounded
    inputs ("arith"), which isolates the kernel's arithmetic from that rounding.
(c) the duality properties are the JAX side's (equiv/mamba3).

On a CUDA machine everything runs as shipped. On CPU set TRITON_INTERPRET=1: the SISO kernel and the
model then run through Triton's interpreter with the adaptations of equiv_reference/mamba3/kernels.py
(recorded in the JSON), so their rows measure the kernels' algorithms in float32, not the GPU's
numerics; TileLang MIMO and the CuTe step need a GPU and their rows say so (NOT RUN, with why).
It prints one table and writes the JSON (default: mamba3-validate-oracle.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from equiv.compare import compare_tap
from equiv.mamba3 import oracle
from equiv_reference.mamba3 import kernels

AGREE = 1e-12  # float64 references: max relative difference allowed
FLOAT32_LIMITED = 1e-6  # a reference that keeps part of its arithmetic in float32
SISO_SHAPES = {  # name: (batch, seqlen, ngroups, nheads, d_state, headdim, rope angles, chunk)
    "gpu": [(1, 200, 1, 8, 64, 64, 16, 64), (2, 130, 2, 4, 128, 64, 32, 64), (1, 300, 1, 32, 128, 64, 32, 64),
            (2, 77, 4, 4, 32, 32, 16, 16)],
    "cpu": [(1, 40, 1, 3, 16, 32, 4, 16), (2, 37, 2, 4, 16, 16, 8, 16)],
}
MIMO_SHAPES = [(1, 200, 1, 4, 2, 64, 64, 16, 16), (2, 130, 1, 8, 4, 128, 64, 32, 16)]
# (batch, seqlen, ngroups, nheads, rank, d_state, headdim, rope angles, chunk)
FIXTURES = ("mamba3-tiny-siso", "mamba3-tiny-siso-rope1-outnorm", "mamba3-tiny-mimo")


def _rng(seed):
    return np.random.default_rng(seed)


def _rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def _t(a, dtype=torch.float64, device="cpu"):
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)


def _np(t):
    return t.detach().cpu().double().numpy()


def _ratio_row(name: str, kernel, o32, o64, **extra) -> dict:
    """The budget ratio of `kernel` against the float64 oracle, the oracle's float32 run as yardstick."""
    c = compare_tap(name, np.asarray(kernel, np.float32), np.asarray(o32, np.float32), np.asarray(o64))
    return {"check": name, "ratio": c.ratio, "ratio_max": c.ratio_max, "err_kernel": c.err_port,
            "err_float32": c.err_ref, "scale": _rms(o64), **extra}


def _not_run(name: str, why) -> dict:
    text = f"{type(why).__name__}: {why}" if isinstance(why, BaseException) else why
    return {"check": name, "not_run": text}


# ---------------------------------------------------------------------------------------------
# (a) the oracle against mamba_ssm's pure-torch references, float64


def _step_inputs(rng, b, h, p, n, rank):
    return dict(state=rng.standard_normal((b, h, p, n)), Bstate=rng.standard_normal((b, rank, h, n)),
                Xstate=rng.standard_normal((b, h, p)), A=-np.log1p(np.exp(rng.standard_normal((b, h)))),
                B=rng.standard_normal((b, rank, h, n)), C=rng.standard_normal((b, rank, h, n)),
                D=1 + 0.3 * rng.standard_normal(h), x=rng.standard_normal((b, h, p)),
                dt=np.log1p(np.exp(rng.standard_normal((b, h)) - 2)),
                trap=1 / (1 + np.exp(-rng.standard_normal((b, h)))),
                xproj=1 + 0.3 * rng.standard_normal((rank, h, p)))


def oracle_step(i: dict, dtype=np.float64):
    """One step of oracle.ssm from a given state, B and C already rotated (angle 0, theta 0)."""
    b, rank, h, n = i["B"].shape
    state = oracle.State(np.zeros((b, h, 1)), i["state"], i["Bstate"], i["Xstate"])
    one = {k: i[k][:, None] for k in ("x", "dt", "A", "trap", "B", "C")}
    y, st, _ = oracle.ssm(one["x"], one["dt"], one["A"], one["trap"], one["B"], one["C"], np.zeros((b, 1, 1)),
                          i["D"], i["xproj"].transpose(1, 0, 2), state, dtype=dtype)
    return y[:, 0], st.ssm  # (b, R, h, p), (b, h, p, n)


def check_fused_step_reference(seed: int) -> list[dict]:
    ref = kernels.fused_step_reference()
    rows = []
    for rank in (1, 2, 4):
        i = _step_inputs(_rng(seed + rank), 2, 3, 16, 8, rank)
        y64, h64 = oracle_step(i)
        t = {k: _t(v) for k, v in i.items()}
        y, h = ref(t["state"], t["A"], t["B"], t["C"], t["xproj"], t["x"], None, None, t["dt"], t["Bstate"],
                   t["Xstate"], t["trap"], t["D"], None, compute_dtype=torch.float64)
        rel = max(_rel(_np(y), y64), _rel(_np(h), h64))
        rows.append({"check": f"selective_state_update_fused_ref_v2 R={rank}", "max_rel": rel,
                     "pass": rel < AGREE, "source": ref.source})
    return rows


def check_rotary_reference(seed: int) -> list[dict]:
    code = kernels.load_mamba3()
    ref = kernels.rotary_step_reference(code)
    rows = []
    for pairwise in (True, False):
        for a in (4, 8):  # n = 16: rope_fraction 0.5 and 1.0
            rng = _rng(seed + a + 10 * pairwise)
            b, rank, h, n = 2, 2, 3, 16
            q, k = rng.standard_normal((b, rank, h, n)), rng.standard_normal((b, rank, h, n))
            st, proj = rng.standard_normal((b, h, a)), rng.standard_normal((b, h, a))
            dt, bq, bk = np.abs(rng.standard_normal((b, h))), rng.standard_normal((rank, h, n)), \
                rng.standard_normal((rank, h, n))
            qo, ko, theta = ref(_t(q), _t(k), _t(st), _t(proj), _t(dt), _t(bq), _t(bk),
                                rotate_pairwise=pairwise)
            th = st + math.pi * np.tanh(proj) * dt[..., None]
            q64 = oracle.rotate(q + bq, th[:, None], pairwise)
            k64 = oracle.rotate(k + bk, th[:, None], pairwise)
            rel = max(_rel(_np(qo), q64), _rel(_np(ko), k64), _rel(_np(theta), th))
            rows.append({"check": f"apply_rotary_qk_inference_reference pairwise={pairwise} a={a} n={n}",
                         "max_rel": rel, "pass": rel < AGREE})
    return rows


def _siso_inputs(rng, b, l, g, h, n, p, a):
    def normed(shape):
        x = rng.standard_normal(shape)
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-5)

    dt = np.log1p(np.exp(rng.standard_normal((b, h, l)) - 2.5))
    return dict(Q=normed((b, l, g, n)), K=normed((b, l, g, n)), V=rng.standard_normal((b, l, h, p)),
                ADT=-np.log1p(np.exp(rng.standard_normal((b, h, l)))) * dt, DT=dt,
                Trap=rng.standard_normal((b, h, l)), Q_bias=1 + 0.3 * rng.standard_normal((h, n)),
                K_bias=1 + 0.3 * rng.standard_normal((h, n)), angle=rng.standard_normal((b, l, a)),
                D=1 + 0.3 * rng.standard_normal(h))


def oracle_siso(i: dict, dtype=np.float64):
    """oracle.ssm on the SISO kernel's arguments (Z=None): (b, l, h, p)."""
    h = i["V"].shape[2]
    g = i["Q"].shape[2]
    heads = lambda v: np.repeat(v, h // g, axis=2)  # noqa: E731 - (b l g n) -> (b l h n)
    dt = i["DT"].transpose(0, 2, 1)
    lam = 1 / (1 + np.exp(-i["Trap"].transpose(0, 2, 1)))
    y, _, _ = oracle.ssm(i["V"], dt, i["ADT"].transpose(0, 2, 1) / dt, lam,
                         (heads(i["K"]) + i["K_bias"])[:, :, None], (heads(i["Q"]) + i["Q_bias"])[:, :, None],
                         i["angle"], i["D"], None, dtype=dtype)
    return y[:, :, 0]


def _bf16(a):
    return torch.from_numpy(np.asarray(a, np.float32)).to(torch.bfloat16).double().numpy()


def check_tests_references(tests_dir: Path, seed: int) -> list[dict]:
    """mamba_ssm's tests/ops/triton/test_mamba3_siso.py references in float64 against the oracle."""
    path = tests_dir / "tests" / "ops" / "triton" / "test_mamba3_siso.py"
    if not path.is_file():
        path = tests_dir / "ops" / "triton" / "test_mamba3_siso.py"
    if not path.is_file():
        return [_not_run("mamba_ssm tests' references",
                         f"no tests/ops/triton/test_mamba3_siso.py under {tests_dir}")]
    code = kernels.load_mamba3()
    from equiv_reference.mamba_ssm_refs import PACKAGE, bare_package, restore_modules

    owned = lambda n: n == PACKAGE or n.startswith(PACKAGE + ".")  # noqa: E731
    before = {k: v for k, v in sys.modules.items() if owned(k)}
    sys.modules[PACKAGE] = bare_package(importlib.util.find_spec(PACKAGE))
    try:
        spec = importlib.util.spec_from_file_location("mamba3_siso_tests", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - reported as a row
        return [_not_run(f"import {path}", e)]
    finally:
        restore_modules(before, owned)
    del code
    rows = []
    # float32-representable inputs: mamba3_siso_fwd_ref casts ADT and DT to float32 whatever its dtype
    raw = _siso_inputs(_rng(seed), 2, 37, 1, 3, 16, 16, 4)
    # mamba3_siso_fwd_ref keeps ADT, DT (the decays) and the angle cumsum in float32 whatever its dtype
    # argument (ADT.to(torch.float32), Angles.float()): it can agree only to float32 rounding
    for rotation in ("rotating", "zero angles"):
        i = {k: v.astype(np.float32).astype(np.float64) for k, v in raw.items()}
        if rotation == "zero angles":
            i["angle"] = np.zeros_like(i["angle"])
        y64 = oracle_siso(i)
        (b, l, a), h = i["angle"].shape, i["V"].shape[2]
        angles = np.broadcast_to(i["angle"][:, :, None], (b, l, h, a))
        names = ("Q", "K", "V", "ADT", "DT", "Trap", "Q_bias", "K_bias")
        args = [_t(i[k]) for k in names] + [_t(angles), _t(i["D"])]
        for name in ("mamba3_siso_step_ref", "mamba3_siso_fwd_ref"):
            fn = getattr(module, name, None)
            if fn is None:
                rows.append(_not_run(name, f"{path} defines no {name}"))
                continue
            kwargs = {"dtype": torch.float64} if name == "mamba3_siso_fwd_ref" else {}
            try:
                out = fn(*args, None, **kwargs)[0]
            except Exception as e:  # noqa: BLE001
                rows.append(_not_run(name, e))
                continue
            rel = _rel(_np(out), y64)
            limited = name == "mamba3_siso_fwd_ref"
            limit, note = (FLOAT32_LIMITED, "its decays and angles are float32") if limited else (AGREE, "")
            rows.append({"check": f"tests {name} (float64, {rotation})", "max_rel": rel, "pass": rel < limit,
                         "limit": limit, "note": note, "source": str(path)})
    return rows


# ---------------------------------------------------------------------------------------------
# (b) kernels against the oracle


def check_siso_kernel(device: str, seed: int) -> list[dict]:
    code = kernels.load_mamba3()
    rows = []
    for shape in SISO_SHAPES["gpu" if device != "cpu" else "cpu"]:
        b, l, g, h, n, p, a, chunk = shape
        i = _siso_inputs(_rng(seed + l), b, l, g, h, n, p, a)
        i32 = {k: np.asarray(v, np.float32) for k, v in i.items()}
        angles = np.broadcast_to(i32["angle"][:, :, None], (b, l, h, a)).copy()
        t = {k: _t(v, torch.float32, device) for k, v in i32.items()}
        fn = code.siso_combined.mamba3_siso_combined
        if device == "cpu":
            kernels.adapt_for_interpreter(code, ptx=True, float32_inputs=True)
            fn = kernels.siso_combined_without_bf16_casts(code)
        try:
            with torch.no_grad(), _cuda_device_stub(device):
                out = fn(t["Q"], t["K"], t["V"], t["ADT"], t["DT"], t["Trap"], t["Q_bias"], t["K_bias"],
                         _t(angles, torch.float32, device), t["D"], None, chunk_size=chunk)
        except Exception as e:  # noqa: BLE001 - a shape the kernel refuses is a row
            rows.append(_not_run(f"siso_combined {shape}", e))
            continue
        finally:
            if device == "cpu":
                kernels.restore(code)
        o64, o32 = oracle_siso(i32), oracle_siso(i32, np.float32)
        row = _ratio_row(f"siso_combined b{b} l{l} g{g} h{h} n{n} p{p} a{a} chunk{chunk}", _np(out), o32, o64)
        if device != "cpu":  # the interpreter's kernel read float32 inputs: no bfloat16 rounding to separate
            rounded = dict(i32, **{k: _bf16(i32[k]) for k in ("Q", "K", "V", "Trap", "angle")})
            arith = compare_tap("arith", _np(out).astype(np.float32), oracle_siso(rounded, np.float32),
                                oracle_siso(rounded))
            row["ratio_arith"] = arith.ratio
        rows.append(row)
    return rows


def check_mimo_kernel(device: str, seed: int) -> list[dict]:
    code = kernels.load_mamba3()
    if "mamba3_mimo_combined" in code.missing:
        return [_not_run("TileLang mamba3_mimo", code.missing["mamba3_mimo_combined"])]
    if device == "cpu":
        return [_not_run("TileLang mamba3_mimo", "TileLang has no CPU form")]
    fn = code.mamba3.mamba3_mimo_combined
    rows = []
    for shape in MIMO_SHAPES:
        b, l, g, h, r, n, p, a, chunk = shape
        rng = _rng(seed + l)
        base = _siso_inputs(rng, b, l, g, h, n, p, a)
        Q, K = rng.standard_normal((b, l, r, g, n)), rng.standard_normal((b, l, r, g, n))
        Q, K = (v / np.sqrt(np.mean(v * v, -1, keepdims=True) + 1e-5) for v in (Q, K))
        qb, kb = 1 + 0.3 * rng.standard_normal((h, r, n)), 1 + 0.3 * rng.standard_normal((h, r, n))
        mx, mz = (1 + 0.3 * rng.standard_normal((h, r, p))) / r, 1 + 0.3 * rng.standard_normal((h, r, p))
        f32 = lambda v: _t(np.asarray(v, np.float32), torch.float32, device)  # noqa: E731
        angles = np.broadcast_to(base["angle"][:, :, None], (b, l, h, a)).copy()
        divisor = 2 if 2 * a == n else 4
        try:
            with torch.no_grad():
                out = fn(Q=f32(Q), K=f32(K), V=f32(base["V"]), ADT=f32(base["ADT"]), DT=f32(base["DT"]),
                         Trap=f32(base["Trap"]), Q_bias=f32(qb), K_bias=f32(kb), MIMO_V=f32(mx),
                         MIMO_Z=f32(mz), MIMO_Out=None, Angles=f32(angles), D=f32(base["D"]), Z=None,
                         chunk_size=chunk,
                         rotary_dim_divisor=divisor, dtype=torch.float32, return_state=False)
        except Exception as e:  # noqa: BLE001
            rows.append(_not_run(f"mimo {shape}", e))
            continue
        ins = dict(base, B=np.repeat(K, h // g, axis=3) + kb.transpose(1, 0, 2),
                   C=np.repeat(Q, h // g, axis=3) + qb.transpose(1, 0, 2), mimo_x=mx)
        rows.append(_ratio_row(f"mimo b{b} l{l} g{g} h{h} R{r} n{n} p{p} a{a} chunk{chunk}", _np(out),
                               _oracle_mimo(ins, np.float32), _oracle_mimo(ins, np.float64)))
    return rows


def _oracle_mimo(i: dict, dtype):
    """oracle.ssm on the MIMO kernel's arguments (B, C already per head and biased): (b, l, R, h, p)."""
    dt = i["DT"].transpose(0, 2, 1)
    lam = 1 / (1 + np.exp(-i["Trap"].transpose(0, 2, 1)))
    y, _, _ = oracle.ssm(i["V"], dt, i["ADT"].transpose(0, 2, 1) / dt, lam, i["B"], i["C"], i["angle"],
                         i["D"], i["mimo_x"], pairwise=False, dtype=dtype)
    return y


def _oracle_rotary(q, k, st, proj, dt, bq, bk, pairwise: bool, dtype):
    """The rotary step from the oracle's functions, on float32 inputs widened to `dtype`."""
    c = lambda v: np.asarray(v, np.float32).astype(dtype)  # noqa: E731
    theta = c(st) + dtype(math.pi) * np.tanh(c(proj)) * c(dt)[..., None]
    return np.concatenate([oracle.rotate(c(q) + c(bq), theta[:, None], pairwise).ravel(),
                           oracle.rotate(c(k) + c(bk), theta[:, None], pairwise).ravel(), theta.ravel()])


def check_step_kernels(device: str, seed: int) -> list[dict]:
    code = kernels.load_mamba3()
    rows = []
    # Triton rotary step (runs in the interpreter too)
    rng = _rng(seed + 7)
    b, r, h, n, a = 2, 2, 4, 32, 8
    q, k = rng.standard_normal((b, r, h, n)), rng.standard_normal((b, r, h, n))
    st, proj = rng.standard_normal((b, h, a)), rng.standard_normal((b, h, a))
    dt = np.abs(rng.standard_normal((b, h)))
    bq, bk = rng.standard_normal((r, h, n)), rng.standard_normal((r, h, n))
    for pairwise in (True, False):
        f32 = lambda v: _t(np.asarray(v, np.float32), torch.float32, device)  # noqa: E731
        try:
            with torch.no_grad(), _cuda_device_stub(device):
                qo, ko, th = code.rotary_step.apply_rotary_qk_inference_fwd(
                    f32(q), f32(k), f32(st), f32(proj), f32(dt), bias_q=f32(bq), bias_k=f32(bk),
                    rotate_pairwise=pairwise)
        except Exception as e:  # noqa: BLE001
            rows.append(_not_run(f"rotary step pairwise={pairwise}", e))
            continue
        rows.append(_ratio_row(f"rotary step (Triton) pairwise={pairwise}",
                               np.concatenate([_np(qo).ravel(), _np(ko).ravel(), _np(th).ravel()]),
                               _oracle_rotary(q, k, st, proj, dt, bq, bk, pairwise, np.float32),
                               _oracle_rotary(q, k, st, proj, dt, bq, bk, pairwise, np.float64)))
    # CuTe step
    if "mamba3_step_fn" in code.missing:
        return rows + [_not_run("CuTe mamba3_step_fn", code.missing["mamba3_step_fn"])]
    step = code.mamba3.mamba3_step_fn
    for rank in (1, 4):
        raw = _step_inputs(_rng(seed + 11 * rank), 2, 8, 64, 128, rank)
        i = {k: np.asarray(v, np.float32) for k, v in raw.items()}
        t = {k: _t(v, torch.float32, device) for k, v in i.items()}
        out = torch.empty(2, rank, 8, 64, device=device)
        try:
            with torch.no_grad():
                names = ("state", "Bstate", "Xstate", "A", "B", "C", "D", "x", "dt", "trap", "xproj")
                step(*(t[k] for k in names),
                     outproj=None, state_out=None, out=out, z=None, zproj=None, tile_D=64, num_warps=4)
        except Exception as e:  # noqa: BLE001
            rows.append(_not_run(f"CuTe step R={rank}", e))
            continue
        y64, h64 = oracle_step(i)
        y32, h32 = oracle_step(i, np.float32)
        rows.append(_ratio_row(f"CuTe step R={rank} (output)", _np(out), y32, y64))
        rows.append(_ratio_row(f"CuTe step R={rank} (state)", _np(t["state"]), h32, h64))
    return rows


class _cuda_device_stub:
    """torch.cuda.device stand-in in the interpreter (as the runner's)."""

    def __init__(self, device):
        self.cpu, self.saved = device == "cpu", None

    def __enter__(self):
        if self.cpu:
            from equiv_reference.mamba3.runner import _NoCudaDevice

            self.saved, torch.cuda.device = torch.cuda.device, _NoCudaDevice
        return self

    def __exit__(self, *exc):
        if self.cpu:
            torch.cuda.device = self.saved
        return False


def check_fixtures(root: Path, device: str, seed: int, torch_step: bool = False) -> list[dict]:
    from equiv_reference.mamba3.oracle_runner import Mamba3OracleRunner
    from equiv_reference.mamba3.runner import Mamba3SsmRunner

    rows = []
    for name in FIXTURES:
        path = root / name
        try:
            ref = Mamba3SsmRunner(path, "float32", device=device, interpreter_adaptations=device == "cpu",
                                  torch_step_fallback=torch_step)
        except Exception as e:  # noqa: BLE001
            rows.append(_not_run(f"{name} model", e))
            continue
        o64, o32 = Mamba3OracleRunner(path, "float64"), Mamba3OracleRunner(path, "float32")
        ids = _rng(seed).integers(0, ref.cfg.vocab_size, (1, 40 if device == "cpu" else 200)).astype(np.int32)
        got, want, yard = ref.run(ids), o64.run(ids), o32.run(ids)
        for tap in ref.tap_names:
            rows.append(_ratio_row(f"{name} {tap}", got[tap], yard[tap], want[tap]))
        P = ids.shape[1] - 8
        try:
            steps = ref.step_logits(ids, None, P)[:, :-1]
        except Exception as e:  # noqa: BLE001 - the decode kernels can be missing where the prefill runs
            rows.append(_not_run(f"{name} decode", e))
        else:
            rows.append(_ratio_row(f"{name} decode step_logits vs oracle full", steps,
                                   yard["logits"][:, P - 1:-1], want["logits"][:, P - 1:-1]))
        rows[-1]["provenance_code_paths"] = ref.provenance()["code_paths"]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("mamba3-validate-oracle.json"))
    ap.add_argument("--mamba-tests", type=Path, help="a checkout of mamba_ssm's repository (its tests/)")
    ap.add_argument("--fixtures-root", type=Path, default=Path("fixtures"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-step", action="store_true",
                    help="model decode through mamba_ssm's torch reference of the CuTe step where it cannot "
                         "import")
    ap.add_argument("--skip", default="",
                    help="comma-separated sections to skip: refs,siso,mimo,step,fixtures")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not kernels.interpreted():
        print("note: no CUDA and TRITON_INTERPRET is not 1: only the float64 references run", file=sys.stderr)
    skip = set(filter(None, args.skip.split(",")))
    sections = {"refs": lambda: check_fused_step_reference(args.seed) + check_rotary_reference(args.seed)
                + (check_tests_references(args.mamba_tests, args.seed) if args.mamba_tests else []),
                "siso": lambda: check_siso_kernel(device, args.seed),
                "mimo": lambda: check_mimo_kernel(device, args.seed),
                "step": lambda: check_step_kernels(device, args.seed),
                "fixtures": lambda: check_fixtures(args.fixtures_root, device, args.seed, args.torch_step)}
    if device == "cpu" and not kernels.interpreted():
        skip |= {"siso", "step", "fixtures"}
    results = {}
    for name, run in sections.items():
        if name in skip:
            continue
        t0 = time.perf_counter()
        print(f"-- {name}: running", flush=True)  # the first kernel section also compiles and autotunes
        try:
            results[name] = run()
        except Exception as e:  # noqa: BLE001 - a section that cannot run is reported, the rest still runs
            results[name] = [_not_run(name, e)]
        print(f"-- {name}: {len(results[name])} rows in {time.perf_counter() - t0:.0f} s", flush=True)
        args.json.write_text(json.dumps({"partial": True, "results": results}, indent=1, sort_keys=True,
                                        default=str) + "\n")  # nothing lost if a later section hangs
    print(f"{'check':74s} {'ratio':>10s} {'max-ratio':>10s} {'arith':>8s}")
    for name, rows in results.items():
        print(f"-- {name}")
        for r in rows:
            if "not_run" in r:
                print(f"{r['check'][:74]:74s} NOT RUN: {r['not_run'][:120]}")
            elif "max_rel" in r:
                agree = ("agree" if r["pass"] else "DIFFER") + (f", {r['note']}" if r.get("note") else "")
                print(f"{r['check'][:74]:74s} {agree} (max rel {r['max_rel']:.2e})")
            else:
                arith = f"{r['ratio_arith']:8.3g}" if r.get("ratio_arith") is not None else ""
                print(f"{r['check'][:74]:74s} {r['ratio']:10.4g} {r['ratio_max']:10.4g} {arith}")
    code = kernels.load_mamba3()
    meta = {"device": device, "gpu": torch.cuda.get_device_name() if device != "cpu" else None,
            "interpreter": kernels.interpreted(), "mamba_ssm": code.version, "torch": torch.__version__,
            "triton": __import__("triton").__version__, "python": platform.python_version(),
            "stubbed_kernels": dict(code.missing),
            "interpreter_adaptations": kernels.INTERPRETER_ADAPTATIONS if device == "cpu" else {}}
    report = {"meta": meta, "results": results}
    args.json.write_text(json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
