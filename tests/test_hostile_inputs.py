"""Hostile inputs, generated: every class of bad input `equiv diff` / `equiv check` can be handed,
drawn by hypothesis strategies, each run through the real command line in a subprocess.

The promise under test: a bad input gets ONE line naming what was expected and what came, exit
status 2, no traceback, no hang, and bounded memory for a small input; and identical non-finite
values on the port and the reference are never blamed on the port.

Classes (cases drawn per class, ci profile; derandomized, so CI sees the same cases every run):

- files (28): config.json, the weights, a shard, a shard index, generation_config.json,
  training.json (through `equiv check`) and pytorch_model.bin as FIFOs, sockets, symlinks to
  /dev/zero, symlink loops, broken symlinks, directories, over-long link targets; JSON nested at
  random depths, JSON values that are not objects, sparse files past the size limit;
- paths (24): random path garbage (newlines, escape sequences, NUL, bidi controls, up to 6000
  characters) as the checkpoint, as a directory holding a bad config, as --port, --reference and
  --out;
- sizes (20): --seq-len / --batch past what any way of running fits (at least 10**7 tokens: even the
  three sides' logits exceed the cap, so a layer-streamed diff cannot take them either), and every
  config dimension set huge (a free one, chunk_size, is refused by the memory estimate; the others
  by the weights' shapes), some through `equiv check`; run with SSM_EQUIV_MAX_MEMORY=1G, the
  documented cap;
- archives (20): pytorch_model.bin archives with compressed records declaring up to 4 GiB, real
  deflate bombs, stored records whose sizes disagree or overlap, bare pickles naming random
  globals, damaged archives and garbage;
- plugins (30): --port / --reference plug-ins that raise random exception types (SystemExit and
  GeneratorExit included, messages with newlines, escape codes, 10k characters, an unprintable
  one) at import, in the factory, load, forward, info, run, provenance, memory_estimate, or that
  return random wrong objects;
- nonfinite (14): identical NaN/inf at random positions of a random tap on the port and the
  reference (12, plug-ins; the verdict must not blame the port, and a port-only NaN still must be
  blamed), and real tiny-g2 copies whose pre-mixer norm weight is near 3e38, so the built-in port
  and transformers overflow alike (2);
- zeros (4): every tap exactly zero on every side (plug-ins, and tiny-g2 with a zero embedding or
  all-zero weights): INCONCLUSIVE, exit 2, never EQUIVALENT.

140 cases in all. One child process per class (tests/hostile_child.py) runs its cases in turn, each
under an alarm, in an address space capped at 6 GiB, and reports each case's result and the
child's peak RSS (ru_maxrss). The bound asserted is 1.5 GB per class; the worst measured on the
2-core CI machine is about 0.75 GB (the transformers classes: torch, transformers and JAX loaded),
where the unbounded inputs used 3.4 GB and more before these checks. `pytest -s` prints, per
class, the cases, the worst peak RSS and the wall time; the whole file takes about 90 s there.

    python -m pytest -q -s tests/test_hostile_inputs.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import time
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import equiv
from equiv.io.safetensors_io import read_safetensors, write_safetensors
from tests.hostile_plugins import EXCEPTIONS

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "fixtures" / "tiny-g2"
CHILD = ROOT / "tests" / "hostile_child.py"
RSS_BOUND_KB = int(1.5e9 / 1024)
ADDRESS_SPACE = 6 * 2**30
ERROR_LINE = re.compile(r"^equiv: (\[[^\]\n]*\] )?error: ")
SUMMARY: dict[str, dict] = {}


# ---------------------------------------------------------------------------------------------
# drawing cases: hypothesis generates the specs (plain data); the test materialises them on disk


def draw(strategy, n: int) -> list:
    """n examples of `strategy`, derandomized: the same specs every run."""
    found = []

    @settings(max_examples=n, database=None, derandomize=True, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(spec):
        found.append(spec)

    collect()
    return found[:n]


def base_checkpoint(path: Path, weights: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(BASE / "config.json", path / "config.json")
    if weights:
        shutil.copy(BASE / "model.safetensors", path / "model.safetensors")
    return path


def deep_json(depth: int, kinds: list[bool]) -> bytes:
    """Valid JSON nested `depth` deep, lists and objects mixed as `kinds` says."""
    opens = [b'{"k":' if kinds[i % len(kinds)] else b"[" for i in range(depth)]
    closes = [b"}" if kinds[i % len(kinds)] else b"]" for i in range(depth)]
    return b"".join(opens) + b"1" + b"".join(reversed(closes))


def special(path: Path, kind: str, depth: int = 100) -> str:
    """Make `path` a special entry of `kind`; return the fragment the error line must contain."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
        return "FIFO"
    if kind == "socket":
        os.mknod(path, stat.S_IFSOCK | 0o600)
        return "a socket"
    if kind == "dev_zero":
        os.symlink("/dev/zero", path)
        return "a character device"
    if kind == "loop":
        os.symlink(path.name + ".b", path)
        os.symlink(path.name, path.with_name(path.name + ".b"))
        return "a symlink loop"
    if kind == "dangling":
        os.symlink(path.name + ".nowhere", path)
        return "a broken symlink"
    if kind == "directory":
        path.mkdir()
        return "a directory"
    if kind == "too_long":
        os.symlink("x" * 300, path)
        return "a path too long"
    raise ValueError(kind)


SPECIAL = ["fifo", "socket", "dev_zero", "loop", "dangling", "directory", "too_long"]
JSON_TARGETS = {"config.json": 16 * 2**20, "model.safetensors.index.json": 64 * 2**20,
                "generation_config.json": 2**20, "training.json": 2**20}


# ---------------------------------------------------------------------------------------------
# class: files

files_specs = st.fixed_dictionaries({
    "target": st.sampled_from(["config.json", "model.safetensors", "shard", "model.safetensors.index.json",
                               "generation_config.json", "training.json", "pytorch_model.bin"]),
    "kind": st.sampled_from(SPECIAL + ["deep", "not_object", "oversize", "deep_header"]),
    "depth": st.integers(65, 200_000),
    "kinds": st.lists(st.booleans(), min_size=1, max_size=4),
    "value": st.sampled_from(["[]", "null", "3", '"x"', "true", "[{}]"]),
    "extra": st.integers(1, 2**20),
    "fallback": st.sampled_from(SPECIAL),
    "check": st.booleans(),
})


def files_case(spec, root: Path):
    target, kind = spec["target"], spec["kind"]
    ckpt = base_checkpoint(root)
    if target == "training.json":
        (ckpt / "training.json").write_text(json.dumps({"prompts": ["ab"], "eos_id": None}))
    if target == "generation_config.json":
        (ckpt / "generation_config.json").write_text("{}")
    path = ckpt / target
    if target in ("shard", "model.safetensors.index.json"):
        (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00001.safetensors")
        names = read_safetensors(ckpt / "model-00001-of-00001.safetensors")
        index = {"weight_map": {k: "model-00001-of-00001.safetensors" for k in names}}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
        if target == "shard":
            path = ckpt / "model-00001-of-00001.safetensors"
    if target == "pytorch_model.bin":
        (ckpt / "model.safetensors").unlink()
    json_target = target in JSON_TARGETS
    if kind in SPECIAL:
        expect = special(path, kind)
    elif kind == "deep" and json_target:
        path.write_bytes(deep_json(spec["depth"], spec["kinds"]))
        expect = "nested at most 64 levels"
    elif kind == "not_object" and json_target and target != "generation_config.json":
        path.write_text(spec["value"])  # a list passes for generation_config.json: transformers judges it
        expect = "expected a JSON object, got"
    elif kind == "oversize" and json_target:
        path.write_bytes(b"")
        os.truncate(path, JSON_TARGETS[target] + spec["extra"])  # sparse: costs no disk
        expect = "of at most"
    elif target in ("model.safetensors", "shard"):  # a header nested past the limit
        blob = path.read_bytes()
        (n,) = struct.unpack("<Q", blob[:8])
        nested = deep_json(spec["depth"] % 5000 + 65, spec["kinds"]).decode()
        hb = (blob[8:8 + n].decode().rstrip()[:-1] + f', "__metadata__": {{"x": {nested}}}}}').encode()
        path.write_bytes(struct.pack("<Q", len(hb)) + hb + blob[8 + n:])
        expect = "nested at most 64 levels"
    else:  # a kind that does not apply to this target: a special file instead
        expect = special(path, spec["fallback"])
    use_check = target == "training.json" or (spec["check"] and target != "generation_config.json")
    argv = (["check", str(ckpt), "--no-properties", "--out", str(root.parent / (root.name + "-report"))]
            if use_check else ["diff", str(ckpt), "--seq-len", "4", "--batch", "1"])
    return {"argv": argv, "expect": expect}


# ---------------------------------------------------------------------------------------------
# class: paths

GARBAGE = st.sampled_from(list("abc._-/: ") + ["\n", "\r", "\t", "\x1b[31m", "\x1b[2J", "\x07", "\x00",
                                              "\u202e", "\u200b", "é", "\x9b", "\x7f"])
paths_specs = st.fixed_dictionaries({
    "pieces": st.lists(GARBAGE, min_size=1, max_size=30),
    "repeat": st.integers(1, 200),
    "use": st.sampled_from(["checkpoint", "directory", "port", "reference", "out"]),
})


def paths_case(spec, root: Path):
    garbage = "".join(spec["pieces"]) * spec["repeat"]
    use = spec["use"]
    root.mkdir(parents=True)
    tiny = str(BASE)
    if use == "directory":
        name = garbage.replace("/", "_").replace("\x00", "_").encode()[:200].decode(errors="ignore") or "x"
        if name in (".", ".."):
            name = "x" + name
        ckpt = root / name
        ckpt.mkdir()
        (ckpt / "config.json").write_text("[1]")
        return {"argv": ["diff", str(ckpt)], "expect": "expected a JSON object, got a JSON list"}
    if use == "checkpoint":
        target = f"{root}/{garbage}"  # joined as text: a garbage starting with '/' stays under root
        try:
            exists = "\x00" not in target and os.path.isdir(target)
        except OSError:
            exists = False
        expect = "config.json" if exists else "checkpoint: expected a directory"
        return {"argv": ["diff", target], "expect": expect}
    if use == "port":
        return {"argv": ["diff", tiny, "--port", garbage], "expect": "port"}
    if use == "reference":
        return {"argv": ["diff", tiny, "--reference", garbage], "expect": "reference"}
    (root / "a_file").write_text("x")  # every --out below it fails: nothing is ever created
    return {"argv": ["diff", tiny, "--out", f"{root}/a_file/{garbage}"], "expect": "report directory"}


# ---------------------------------------------------------------------------------------------
# class: sizes (SSM_EQUIV_MAX_MEMORY=1G for the child)

CONFIG_DIMS = ["chunk_size", "vocab_size", "hidden_size", "state_size", "num_heads", "head_dim", "n_groups",
               "num_hidden_layers", "conv_kernel", "expand"]
sizes_specs = st.one_of(
    # at least 10**7 tokens: even the logits of the three sides exceed the 1G cap, so no way of running
    # (in memory, or streamed layer by layer) fits
    st.fixed_dictionaries({"what": st.just("seq_len"), "n": st.integers(5 * 10**6, 10**12)}),
    st.fixed_dictionaries({"what": st.just("batch"), "n": st.integers(2 * 10**5, 10**12)}),
    st.fixed_dictionaries({"what": st.just("both"), "b": st.integers(1000, 10**6),
                           "n": st.integers(10**4, 10**6)}),
    st.fixed_dictionaries({"what": st.just("config"), "key": st.sampled_from(CONFIG_DIMS),
                           "n": st.integers(4096, 2**31 - 1), "check": st.booleans()}),
    st.fixed_dictionaries({"what": st.just("config"), "key": st.just("chunk_size"),
                           "n": st.integers(4096, 2**31 - 1), "check": st.booleans()}),
)


def sizes_case(spec, root: Path):
    what = spec["what"]
    if what in ("seq_len", "batch", "both"):
        b = spec.get("b", spec["n"] if what == "batch" else 2)
        n = spec["n"] if what != "batch" else 64
        return {"argv": ["diff", str(BASE), "--batch", str(b), "--seq-len", str(n)],
                "expect": "expected a run that fits in memory"}
    ckpt = base_checkpoint(root)
    config = json.loads((ckpt / "config.json").read_text())
    config[spec["key"]] = spec["n"]
    (ckpt / "config.json").write_text(json.dumps(config))
    expect = "fits in memory" if spec["key"] == "chunk_size" else "expected"
    if spec["check"]:
        return {"argv": ["check", str(ckpt), "--no-properties", "--out", f"{root}-report"], "expect": expect}
    return {"argv": ["diff", str(ckpt), "--seq-len", "8", "--batch", "1"], "expect": expect}


# ---------------------------------------------------------------------------------------------
# class: archives (pytorch_model.bin)


def zip_bytes(records: list[tuple[str, int, bytes, int, int | None]]) -> bytes:
    """A zip archive written field by field, so its directory can declare anything: records are
    (name, method, stored bytes, declared uncompressed size, index of an earlier record whose bytes
    this one claims, or None)."""
    body, central, offsets = b"", b"", []
    for name, method, data, declared, at in records:
        nb = name.encode()
        if at is None:
            offsets.append(len(body))
            body += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, 0, len(data), declared,
                                len(nb), 0) + nb + data
            offset, size = offsets[-1], len(data)
        else:
            offset, size = offsets[at], len(records[at][2])
            offsets.append(offset)
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, 0, size, declared,
                               len(nb), 0, 0, 0, 0, 0, offset) + nb
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(records), len(records), len(central), len(body), 0)
    return body + central + end


IDENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
archives_specs = st.fixed_dictionaries({
    "kind": st.sampled_from(["compressed", "bomb", "size_mismatch", "overlap", "pickle_global",
                             "pickle_plain", "garbage", "damaged"]),
    "method": st.sampled_from([8, 12, 14, 99]),
    "declared": st.integers(2**20, 2**32 - 1),
    "megabytes": st.integers(1, 48),
    "copies": st.integers(8, 400),
    "module": IDENT, "name": IDENT,
    "noise": st.binary(min_size=1, max_size=2000),
})


def archives_case(spec, root: Path):
    ckpt = base_checkpoint(root, weights=False)
    kind, path = spec["kind"], ckpt / "pytorch_model.bin"
    pkl = b"\x80\x02}q\x00."  # an empty dict
    if kind == "compressed":
        blob, expect = zip_bytes([("archive/data.pkl", 0, pkl, len(pkl), None),
                                  ("archive/data/0", spec["method"], b"\x03\x00", spec["declared"], None)]), \
            "compressed"
    elif kind == "bomb":  # real deflate data: megabytes of zeros in a few kilobytes
        comp = zlib.compressobj(9, zlib.DEFLATED, -15)
        data = b"".join(comp.compress(b"\0" * 2**20) for _ in range(spec["megabytes"])) + comp.flush()
        blob = zip_bytes([("archive/data.pkl", 0, pkl, len(pkl), None),
                          ("archive/data/0", 8, data, spec["megabytes"] * 2**20, None)])
        expect = "compressed"
    elif kind == "size_mismatch":
        blob = zip_bytes([("archive/data.pkl", 0, pkl, len(pkl), None),
                          ("archive/data/0", 0, b"\0" * 64, spec["declared"], None)])
        expect = "as many bytes as it stores"
    elif kind == "overlap":
        records = [("archive/data/0", 0, b"\0" * 32768, 32768, None)]
        records += [(f"archive/data/{i}", 0, b"", 32768, 0) for i in range(1, spec["copies"])]
        blob, expect = zip_bytes(records), "overlapping records"
    elif kind == "pickle_global":
        blob = (b"\x80\x02c" + spec["module"].encode() + b"\n" + spec["name"].encode() + b"\n)R.")
        expect = "would run code"
    elif kind == "pickle_plain":
        blob, expect = pkl, "bare pickle"
    elif kind == "garbage":
        blob, expect = b"\xff" + spec["noise"], "expected torch.save's zip archive"
    else:
        blob, expect = b"PK\x03\x04" + spec["noise"], "truncated or damaged"
    path.write_bytes(blob)
    return {"argv": ["diff", str(ckpt), "--seq-len", "4", "--batch", "1"], "expect": expect}


# ---------------------------------------------------------------------------------------------
# class: plugins (tests/hostile_plugins.py, on the fake model of tests/fake_port.py)

MESSAGES = st.one_of(st.text(max_size=40), st.sampled_from(["line one\nline two", "\x1b[31mred\x1b[0m\x1b[2J",
                                                            "x" * 10_000, "", "\r\roverwrite", "é\u202e"]))
plugin_specs = st.one_of(
    st.fixed_dictionaries({
        "side": st.sampled_from(["port", "reference"]),
        "stage": st.sampled_from(["import", "factory", "load", "forward", "info", "memory_estimate", "run",
                                  "provenance"]),
        "act": st.just("raise"), "exc": st.sampled_from(sorted(EXCEPTIONS)),
        "message": MESSAGES}),
    st.fixed_dictionaries({
        "side": st.sampled_from(["port", "reference"]),
        "stage": st.sampled_from(["factory", "load", "forward", "info", "memory_estimate", "run",
                                  "provenance", "vocab_size", "missing_method"]),
        "act": st.just("return"),
        "wrong": st.sampled_from(["none", "int", "str", "list", "object", "dict_of_str", "wrong_dims",
                                  "strings", "object_array", "nonstr_key", "ragged", "negative", "bool",
                                  "float", "huge", "dict"])}),
)
PORT_STAGES = {"import", "factory", "load", "forward", "info", "memory_estimate", "vocab_size"}
REFERENCE_STAGES = {"import", "factory", "run", "provenance", "missing_method"}
GOOD_PORT, GOOD_REFERENCE = "tests.fake_port:FakePort", "tests.fake_port:load_fake_reference"


def plugin_module(root: Path, index: int, spec: dict) -> str:
    """Write plug-in module hostile_plugin_<index>.py into `root`; return its name."""
    name = f"hostile_plugin_{index}"
    (root / f"{name}.py").write_text(f"from tests.hostile_plugins import build\n\n"
                                     f"Port, reference = build({spec!r})\n")
    return name


def fake_checkpoint(root: Path) -> Path:
    from tests.fake_port import write_checkpoint

    return write_checkpoint(root / "fake")


def plugins_case(spec, root: Path, index: int, plugin_dir: Path):
    side = spec["side"]
    stage = spec["stage"]
    if side == "port" and stage not in PORT_STAGES:
        side = "reference"
    if side == "reference" and stage not in REFERENCE_STAGES:
        side = "port"
    spec = dict(spec, side=side)
    if spec.get("act") == "return":  # a few draws are valid for this call: use an invalid one instead
        valid = {"provenance": {"dict_of_str", "wrong_dims", "strings", "object_array", "ragged", "dict"},
                 "memory_estimate": {"int"}, "vocab_size": set()}.get(stage, set())
        if spec["wrong"] in valid:
            spec["wrong"] = "list" if stage == "provenance" else "negative"
    mod = plugin_module(plugin_dir, index, spec)
    root.mkdir(parents=True)
    port, ref = (f"{mod}:Port", GOOD_REFERENCE) if side == "port" else (GOOD_PORT, f"{mod}:reference")
    return {"argv": ["diff", str(fake_checkpoint(root)), "--port", port, "--reference", ref, "--seq-len", "4",
                     "--batch", "1"], "expect": f"'{mod}:"}


# ---------------------------------------------------------------------------------------------
# class: nonfinite

TAPS = ["embed", "layers.0.a", "layers.0.mix", "layers.1", "layers.2.a", "norm_f", "logits"]
nonfinite_specs = st.fixed_dictionaries({
    "tap": st.sampled_from(TAPS),
    "positions": st.lists(st.integers(0, 10**6), min_size=1, max_size=60),
    "values": st.lists(st.sampled_from(["nan", "inf", "-inf"]), min_size=1, max_size=60),
    "everywhere": st.booleans(),
    "seq_len": st.integers(2, 12), "batch": st.integers(1, 3),
})


def nonfinite_case(spec, root: Path, index: int, plugin_dir: Path, port_only: bool = False):
    root.mkdir(parents=True)
    values = [spec["values"][i % len(spec["values"])] for i in range(len(spec["positions"]))]
    positions = spec["positions"]
    if spec["everywhere"]:
        positions, values = list(range(4096)), [values[0]] * 4096
    plug = {"stage": "inject", "tap": spec["tap"], "positions": positions, "values": values,
            "port_only": port_only}
    mod = plugin_module(plugin_dir, index, plug)
    argv = ["diff", str(fake_checkpoint(root)), "--port", f"{mod}:Port", "--reference", f"{mod}:reference",
            "--seq-len", str(spec["seq_len"]), "--batch", str(spec["batch"])]
    return {"argv": argv, "mode": "blamed" if port_only else "not_blamed"}


def overflow_checkpoint(root: Path, layer: int, value: float) -> Path:
    """tiny-g2 with layer `layer`'s pre-mixer norm weight at `value` (near float32's max): the
    norm's output overflows to inf alike in the built-in port and in transformers."""
    ckpt = base_checkpoint(root, weights=False)
    tensors = read_safetensors(BASE / "model.safetensors")
    key = f"backbone.layers.{layer}.norm.weight"
    tensors[key] = np.full_like(tensors[key], value)
    write_safetensors(ckpt / "model.safetensors", tensors)
    return ckpt


# ---------------------------------------------------------------------------------------------
# class: zeros


def zero_checkpoint(root: Path) -> Path:
    """tiny-g2 with every weight zero (a zero embedding alone is not enough: the conv bias still
    gives the conv and everything after it values)."""
    ckpt = base_checkpoint(root, weights=False)
    tensors = {k: np.zeros_like(v) for k, v in read_safetensors(BASE / "model.safetensors").items()}
    write_safetensors(ckpt / "model.safetensors", tensors)
    return ckpt


# ---------------------------------------------------------------------------------------------
# running a class in one child, and the checks


def run_class(name: str, cases: list[dict], tmp: Path, env: dict | None = None, timeout: int = 420) -> dict:
    """Run `cases` in one child (tests/hostile_child.py); return its report and wall seconds."""
    for i, case in enumerate(cases):
        case.setdefault("id", f"{name}-{i}")
        case.setdefault("timeout", 120)
    spec_path, out_path = tmp / f"{name}-cases.json", tmp / f"{name}-results.json"
    spec_path.write_text(json.dumps({"cases": cases, "address_space": ADDRESS_SPACE}))
    child_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp / "plugins"), str(ROOT)]),
                     JAX_PLATFORMS="cpu", **(env or {}))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(CHILD), str(spec_path), str(out_path)], cwd=ROOT,
                          env=child_env, capture_output=True, text=True, timeout=timeout)
    wall = time.monotonic() - t0
    assert out_path.exists(), f"{name}: no results (child rc {proc.returncode}): {proc.stderr[-3000:]}"
    report = json.loads(out_path.read_text())
    assert len(report["results"]) == len(cases), (
        f"{name}: the child stopped after {len(report['results'])} of {len(cases)} cases: "
        f"{proc.stderr[-3000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report["wall_s"] = wall
    return report


def _raw_controls(text: str) -> list[str]:
    unsafe = ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")
    return sorted({repr(c) for c in text if c != "\n" and unicodedata.category(c) in unsafe})


def check_exit2(case: dict, result: dict) -> None:
    """Exit 2, exactly one error line (the command's progress lines may precede it) naming the
    problem, nothing raw reaching the terminal, no traceback."""
    where = f"{result['id']} {case['argv']!r:.300}"
    assert not result["crash"], f"{where}: {result['crash'][-2000:]}"
    stderr = result["stderr"]
    assert "Traceback" not in stderr + result["stdout_tail"], f"{where}: {stderr[-2000:]}"
    assert result["rc"] == 2, f"{where}: exit {result['rc']}, stderr {stderr[-1500:]!r}"
    lines = stderr.splitlines()
    errors = [ln for ln in lines if ERROR_LINE.match(ln)]
    assert len(errors) == 1, f"{where}: expected one error line, got {lines!r:.3000}"
    others = [ln for ln in lines if ln not in errors]
    assert all(ln.startswith("equiv: ") for ln in others), f"{where}: stray stderr lines {others!r:.2000}"
    assert not _raw_controls(stderr), f"{where}: raw control characters {_raw_controls(stderr)} on stderr"
    assert len(errors[0]) <= 2100, f"{where}: a {len(errors[0])}-character line"
    if case.get("expect"):
        assert case["expect"] in errors[0], f"{where}: {case['expect']!r} not in {errors[0]!r:.1500}"


def check_not_blamed(case: dict, result: dict) -> None:
    """Identical non-finite values on both sides: never DIVERGENT, never 'the defect is in this op',
    and the not-comparable elements are said (no silent pass)."""
    where = f"{result['id']} {case['argv']!r:.300}"
    assert not result["crash"], f"{where}: {result['crash'][-2000:]}"
    out = result["stdout_tail"]
    assert result["rc"] in (0, 2), f"{where}: exit {result['rc']}: {out[-2500:]}"
    assert "defect is in this op" not in out and "FAIL" not in out, f"{where}: {out[-2500:]}"
    said = "non-finite identically" in re.sub(r"\s+", " ", out + result["stderr"])
    assert said, f"{where}: the not-comparable elements are not said: {out[-1500:]}"


def check_blamed(case: dict, result: dict) -> None:
    """A port-only NaN/inf is still the port's defect."""
    where = f"{result['id']} {case['argv']!r:.300}"
    assert not result["crash"], f"{where}: {result['crash'][-2000:]}"
    out = result["stdout_tail"]
    assert result["rc"] == 1 and "NaN/Inf" in out, f"{where}: {out[-2000:]}"


CHECKS = {"exit2": check_exit2, "not_blamed": check_not_blamed, "blamed": check_blamed}


def run_and_check(name: str, cases: list[dict], tmp: Path, env: dict | None = None) -> None:
    report = run_class(name, cases, tmp, env)
    for case, result in zip(cases, report["results"]):
        CHECKS[case.get("mode", "exit2")](case, result)
    peak = max(r["maxrss_kb"] for r in report["results"])
    worst = max(report["results"], key=lambda r: r["maxrss_kb"] - report["baseline_maxrss_kb"])
    SUMMARY[name] = {"cases": len(cases), "peak_rss_mb": round(peak / 1024),
                     "wall_s": round(report["wall_s"], 1)}
    print(f"\nhostile inputs, {name}: {len(cases)} generated cases, peak RSS {peak / 1024:.0f} MB (baseline "
          f"{report['baseline_maxrss_kb'] / 1024:.0f} MB after imports; largest rise in {worst['id']}), "
          f"{report['wall_s']:.1f} s")
    assert peak <= RSS_BOUND_KB, f"{name}: peak RSS {peak / 1024:.0f} MB > {RSS_BOUND_KB / 1024:.0f} MB"


@pytest.fixture
def plugin_dir(tmp_path) -> Path:
    d = tmp_path / "plugins"
    d.mkdir()
    return d


# ---------------------------------------------------------------------------------------------
# the tests, one child per class


def test_files(tmp_path, plugin_dir):
    specs = draw(files_specs, 28)
    run_and_check("files", [files_case(s, tmp_path / f"c{i}") for i, s in enumerate(specs)], tmp_path)


def test_paths(tmp_path, plugin_dir):
    specs = draw(paths_specs, 24)
    run_and_check("paths", [paths_case(s, tmp_path / f"c{i}") for i, s in enumerate(specs)], tmp_path)


def test_sizes(tmp_path, plugin_dir):
    specs = draw(sizes_specs, 20)
    run_and_check("sizes", [sizes_case(s, tmp_path / f"c{i}") for i, s in enumerate(specs)], tmp_path,
                  env={"SSM_EQUIV_MAX_MEMORY": "1G"})


def test_archives(tmp_path, plugin_dir):
    specs = draw(archives_specs, 20)
    run_and_check("archives", [archives_case(s, tmp_path / f"c{i}") for i, s in enumerate(specs)], tmp_path)


def test_plugins(tmp_path, plugin_dir):
    specs = draw(plugin_specs, 30)
    cases = [plugins_case(s, tmp_path / f"c{i}", i, plugin_dir) for i, s in enumerate(specs)]
    run_and_check("plugins", cases, tmp_path)


def test_nonfinite(tmp_path, plugin_dir):
    specs = draw(nonfinite_specs, 10)
    cases = [nonfinite_case(s, tmp_path / f"c{i}", i, plugin_dir) for i, s in enumerate(specs)]
    cases += [nonfinite_case(s, tmp_path / f"p{i}", 100 + i, plugin_dir, port_only=True)
              for i, s in enumerate(specs[:2])]
    for i, (layer, value) in enumerate([(0, 3.0e38), (1, -2.6e38)]):
        ckpt = overflow_checkpoint(tmp_path / f"o{i}", layer, value)
        cases.append({"argv": ["diff", str(ckpt), "--seq-len", str(12 + 4 * i), "--batch", "2"],
                      "mode": "not_blamed"})
    run_and_check("nonfinite", cases, tmp_path)


def test_zeros(tmp_path, plugin_dir):
    cases = []
    for i in range(2):
        mod = plugin_module(plugin_dir, i, {"stage": "zeros"})
        (tmp_path / f"z{i}").mkdir()
        cases.append({"argv": ["diff", str(fake_checkpoint(tmp_path / f"z{i}")), "--port", f"{mod}:Port",
                               "--reference", f"{mod}:reference", "--seq-len", str(3 + i)],
                      "expect": "all zero on every side"})
    for i in range(2):
        ckpt = zero_checkpoint(tmp_path / f"w{i}")
        cases.append({"argv": ["diff", str(ckpt), "--seq-len", str(8 + 9 * i), "--batch", str(1 + i)],
                      "expect": "no tap could be compared: 0 of 17 taps compared (17 all zero on every side"})
    run_and_check("zeros", cases, tmp_path)


def test_zz_summary():
    """The figures of this file's run (`pytest -s` shows them)."""
    if not SUMMARY:
        pytest.skip("no class ran")
    total = sum(c["cases"] for c in SUMMARY.values())
    worst = max(c["peak_rss_mb"] for c in SUMMARY.values())
    per_class = ", ".join(f"{k} {v['cases']}" for k, v in SUMMARY.items())
    print(f"\nhostile inputs: {total} generated cases ({per_class}); worst peak RSS {worst} MB; child wall "
          f"{sum(c['wall_s'] for c in SUMMARY.values()):.0f} s")


# ---------------------------------------------------------------------------------------------
# one reader: no file is read outside equiv/io/bounded.py

RAW_READ = re.compile(r"\.read_text\(|\.read_bytes\(|\bjson\.loads?\(|(?<![\w.])open\(|\bnp\.load\(|"
                      r"\btorch\.load\(|\btomllib\.load\(")
READER_MODULES = {"equiv/io/bounded.py": "the reader itself",
                  "equiv/io/torch_bin.py": "torch.load on the handle the bounded reader opened and checked"}
NOT_YET_BOUNDED: set[str] = set()  # every scanned module reads through the bounded reader


def _scanned(root: Path) -> list[Path]:
    """The whole `equiv` package, and the modules of `equiv_reference` that open a user's checkpoint
    (the reference runners and model builders); the rest of equiv_reference are developer tools
    reading what this project wrote (fixtures, calibration and training records, benchmarks) or
    an installed library's own source."""
    reference = [p for p in (root / "equiv_reference").rglob("*.py")
                 if "runner" in p.name or p.name in ("mamba_ssm_model.py", "references.py")]
    return sorted((root / "equiv").rglob("*.py")) + sorted(reference)


def _code_lines(path: Path):
    """(line number, code) outside docstrings and comments."""
    import ast

    text = path.read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    for n, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0]
        if n not in docstrings and code.strip():
            yield n, code


def test_no_file_is_read_outside_the_bounded_reader():
    """Every file the suite opens goes through equiv/io/bounded.py: no raw read_text, read_bytes,
    json.load(s), open, np.load, torch.load or tomllib.load anywhere else in the package (nor in
    the reference runners, which open a user's checkpoint too)."""
    root = Path(equiv.__file__).resolve().parents[1]
    found = []
    for path in _scanned(root):
        rel = path.relative_to(root).as_posix()
        if rel in READER_MODULES or rel in NOT_YET_BOUNDED:
            continue
        found += [f"{rel}:{n}: {code.strip()}" for n, code in _code_lines(path) if RAW_READ.search(code)]
    assert not found, "files read outside equiv/io/bounded.py:\n" + "\n".join(found)


# ---------------------------------------------------------------------------------------------
# the comparison rules behind two classes, on arrays


def _triple(seed=0):
    rng = np.random.default_rng(seed)
    oracle = rng.standard_normal((2, 5, 3))
    reference = (oracle + 1e-7 * rng.standard_normal(oracle.shape)).astype(np.float32)
    port = (oracle + 1e-7 * rng.standard_normal(oracle.shape)).astype(np.float32)
    return port, reference, oracle


def test_identical_nonfinite_on_port_and_reference_is_not_comparable_there():
    from equiv.compare import compare_tap, not_compared_kind

    port, reference, oracle = _triple()
    for pos, value in (((0, 1, 2), np.inf), ((1, 3, 0), -np.inf), ((1, 4, 1), np.nan)):
        port[pos] = reference[pos] = value  # the float64 oracle stays finite there
    t = compare_tap("t", port, reference, oracle)
    assert t.verdict == "pass" and t.nonfinite["shared_count"] == 3
    assert t.nonfinite["port_mismatch_count"] == 0
    assert "not comparable at 3 of 30 elements" in t.reason  # said, never a silent pass
    port[:], reference[:] = np.nan, np.nan
    t = compare_tap("t", port, reference, oracle)
    assert t.verdict == "unavailable" and not_compared_kind(t) == "non-finite on both"
    assert "not comparable at every element" in t.reason


def test_a_port_only_or_different_nonfinite_is_still_the_ports_defect():
    from equiv.compare import compare_tap

    port, reference, oracle = _triple()
    port[0, 0, 0] = np.nan
    port[0, 0, 1], reference[0, 0, 1] = np.inf, -np.inf  # both overflowed, not the same way
    t = compare_tap("t", port, reference, oracle)
    assert t.verdict == "fail" and t.nonfinite["port_mismatch_count"] == 2
    assert t.nonfinite["shared_count"] == 0


def test_an_inf_that_is_the_correctly_rounded_value_agrees_with_the_oracle():
    """Beyond float32's range the correctly rounded result is inf: a port that gives it is right."""
    from equiv.compare import compare_tap

    port, reference, oracle = _triple()
    oracle[0, 0, 0] = 1e39
    port[0, 0, 0] = np.inf
    reference[0, 0, 0] = np.float32(3.4e38)
    t = compare_tap("t", port, reference, oracle)
    assert t.nonfinite["port_mismatch_count"] == 0 and t.verdict == "pass"


def test_all_zero_taps_compare_nothing():
    from equiv.compare import ALL_ZERO_REASON, compare_tap, not_compared_kind

    zeros = np.zeros((2, 3, 4))
    t = compare_tap("t", zeros.astype(np.float32), zeros.astype(np.float32), zeros)
    assert t.verdict == "unavailable" and t.reason == ALL_ZERO_REASON and not_compared_kind(t) == "all zero"
    port = zeros.astype(np.float32)
    port[0, 0, 0] = 1e-3  # a port that is not zero where the reference is: compared, and it fails
    assert compare_tap("t", port, zeros.astype(np.float32), zeros).verdict == "fail"
