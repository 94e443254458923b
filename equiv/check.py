"""The main job (`equiv check`, run by `nox -s equivalence`): every bundled fixture through the
layer-wise diff (accumulated and isolated) and the greedy decode match, plus each family's algorithm
property suite (Mamba-2: SSD duality); one summary table and reports under one directory (written by
equiv/check_summary.py), a non-zero exit on any failure.

Model-agnostic: each checkpoint's family (equiv/families.py, from its config.json) names its port
and its reference; the reference comes from a loader callable (live torch runners, or golden
recordings replayed with --golden). Inputs are a pure function of the fixture
and fixed seeds, so two runs produce the same JSON numbers (timings go to timing.json alone).

Exit status: 0 equivalent; 1 a divergence; 2 an input could not be checked (or the reference
library changed under the suite); 3 every check that ran passed but one could not run (NOT RUN,
with its reason), unless the caller allowed that with `allow_not_run` (`--allow-not-run`).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from equiv import compile_cache, tested_versions
from equiv.check_summary import overall_verdict, summary_table, versions_line, write_check_reports
from equiv.decode import DecodeResult, match_greedy
from equiv.errors import EquivError, ReferenceChanged, first_line
from equiv.families import Family, family_of_checkpoint, import_attr
from equiv.inputs import require_checkpoint_dir
from equiv.io.training_json import read_training_json
from equiv.layerwise import LayerwiseResult, run_layerwise
from equiv.memory import require_memory
from equiv.ports import check_loaded_model
from equiv.report_wording import coverage_phrase

EXIT_EQUIVALENT, EXIT_DIVERGENT, EXIT_INPUT, EXIT_NOT_RUN = 0, 1, 2, 3


@dataclass
class Plan:
    """Inputs for one fixture: a pure function of its config and fixed seeds."""

    layerwise_ids: np.ndarray
    decode_batches: list[tuple[np.ndarray, np.ndarray | None]]
    max_new_tokens: int
    eos_id: int | None


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, seqs))
    ids = np.full((len(seqs), width), pad_id, np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    return ids, mask


def plan_for(fixture_path: Path, vocab_size: int, decode_lengths, seed: int = 0,
             unpadded: bool = False) -> Plan:
    """Inputs for one checkpoint, from what the loaded port declares (protocol v1: its vocab_size
    and decode_lengths; an int is one length). Trained checkpoints (with training.json) decode
    their recorded text prompts, 64 tokens each, alone and as one left-padded batch. Any other
    checkpoint decodes one left-padded batch of random prompts whose lengths straddle each decode
    length (n-1, n, n+1), so prefill hands over to decode on both sides of every boundary where the
    port's algorithm changes regime; the layer-wise ids span two of the longest such lengths."""
    lengths = (decode_lengths,) if isinstance(decode_lengths, int) else tuple(decode_lengths)
    rng = np.random.default_rng(seed)
    meta = read_training_json(fixture_path)
    if meta is not None:
        prompts = [list(p.encode("utf-8")) for p in meta["prompts"]]
        eos = meta["eos_id"]
        text = "".join(meta["prompts"]) * 8
        layer_ids = np.asarray([list(text.encode("utf-8"))[:64]], np.int32)
        pad = meta["pad_id"]
        n_new = 64
    else:
        straddle = sorted({m for n in lengths for m in (n - 1, n, n + 1) if m >= 1})
        prompts = [rng.integers(0, vocab_size, n).tolist() for n in straddle]
        layer_ids = rng.integers(0, vocab_size, (2, 2 * max(lengths) + 5)).astype(np.int32)
        eos, pad, n_new = None, 0, 64
    batches = [(np.asarray([p], np.int32), None) for p in prompts] if meta is not None or unpadded else []
    if not unpadded:
        batches.append(left_pad(prompts, pad))
    return Plan(layer_ids, batches, n_new, eos)


def plan_extent(decode_lengths, n_new: int = 64) -> tuple[int, int]:
    """The largest (batch, length) a forward of plan_for's random plan runs (the layer-wise ids; the
    decode batch with its new tokens), known before plan_for allocates anything of that size."""
    lengths = (decode_lengths,) if isinstance(decode_lengths, int) else tuple(decode_lengths)
    return max(2, 3 * len(lengths)), 2 * max(lengths) + 5 + n_new


@dataclass
class FixtureOutcome:
    name: str
    layerwise: dict[str, LayerwiseResult] = field(default_factory=dict)
    decode: list[DecodeResult] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0
    reference: dict = field(default_factory=dict)  # its provenance after every call of the fixture
    not_run: dict[str, str] = field(default_factory=dict)  # check -> why (isolated mode: optional)

    @property
    def verdict(self) -> str:
        if self.error:
            return "error"
        bad = [r for r in self.layerwise.values() if r.verdict != "equivalent"]
        bad += [d for d in self.decode if d.verdict != "pass"]
        return "fail" if bad else "not run" if self.not_run else "pass"

    def to_dict(self) -> dict:
        from equiv.report import to_json_dict

        return {"fixture": self.name, "verdict": self.verdict, "error": self.error or None,
                "reference": self.reference, "not_run": self.not_run or None,
                "layerwise": {mode: to_json_dict(r) for mode, r in self.layerwise.items()},
                "decode": [d.to_dict() for d in self.decode]}


def check_fixture(name: str, path: Path, port, load_ref, progress=print,
                  unpadded: bool = False) -> FixtureOutcome:
    """Layer-wise diff in both modes and the decode match for one fixture. A bad input (corrupt
    checkpoint, missing recording, a port or reference that raises) is recorded on the outcome, so
    the other fixtures still run and the report says what was wrong. A changed reference library
    stops the whole job: every fixture would meet it. `unpadded`: plan_for's, for a reference that
    takes no attention mask."""
    t0 = time.perf_counter()
    try:
        return _check_fixture(name, path, port, load_ref, progress, unpadded)
    except ReferenceChanged:
        raise
    except EquivError as e:
        progress(f"[{name}] error: {e}")
        return FixtureOutcome(name, error=str(e), seconds=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - a port's or library's own exception, named, not a traceback
        message = f"{type(e).__name__} while checking {name}: {first_line(e)}"
        progress(f"[{name}] error: {message}")
        return FixtureOutcome(name, error=message, seconds=time.perf_counter() - t0)


def _check_fixture(name: str, path: Path, port, load_ref, progress, unpadded: bool) -> FixtureOutcome:
    out = FixtureOutcome(name)
    t0 = time.perf_counter()
    model = port.load(path)
    port_name = getattr(port, "name", str(port))
    check_loaded_model(model, port_name, uses=("layer-wise diff", "decode match"))
    require_memory(model, port_name, *plan_extent(model.decode_lengths),
                   f"{name}: the inputs its decode_lengths {tuple(model.decode_lengths)[:4]} imply")
    plan = plan_for(path, int(model.vocab_size), model.decode_lengths, unpadded=unpadded)
    for ids, _ in plan.decode_batches:
        require_memory(model, port_name, ids.shape[0], ids.shape[1] + plan.max_new_tokens,
                       f"{name}: a decode batch of {ids.shape[0]} x {ids.shape[1]} tokens")
    reference, oracle = load_ref(path, "float32"), load_ref(path, "float64")
    for mode in ("accumulated", "isolated"):
        progress(f"[{name}] layer-wise diff, {mode}")
        out.layerwise[mode] = run_layerwise(model, reference, oracle, plan.layerwise_ids, None, mode=mode,
                                            seed=0)
        cannot = [n for n in out.layerwise[mode].notes if n.startswith("the port cannot run isolated mode")]
        if cannot:  # isolated mode is optional in protocol v1: not run, said, never a pass
            out.not_run[mode] = f"{port_name}: {cannot[0]}"
            del out.layerwise[mode]
            continue
        if out.layerwise[mode].verdict == "inconclusive":  # nothing compared is no verdict: an input error
            raise EquivError(f"{name}: {mode} layer-wise diff: no tap could be compared: "
                             f"{coverage_phrase(out.layerwise[mode])}")
    for i, (prompts, mask) in enumerate(plan.decode_batches):
        progress(f"[{name}] greedy decode {i + 1}/{len(plan.decode_batches)}: "
                 f"{prompts.shape[0]} prompt(s) x {plan.max_new_tokens} tokens")
        out.decode.append(match_greedy(model, reference, oracle, prompts, mask, plan.max_new_tokens,
                                       plan.eos_id))
    out.reference = dict(reference.provenance()) if hasattr(reference, "provenance") else {}
    out.seconds = time.perf_counter() - t0
    return out


def not_run(reason: str) -> dict:
    return {"verdict": "not run", "detail": reason}


def run_property_suite(fam: Family, golden: bool, examples: int | None = None, progress=print) -> dict:
    """A family's algorithm property suite in this process, its budget from torch-free references in
    golden mode (numpy float32 counterparts, numpy float64 oracle) and torch's in a live run; what
    it cannot import is NOT RUN with the reason."""
    suite = fam.properties
    try:
        run = import_attr(suite.run, f"{fam.title} property suite")
        make_refs = import_attr(suite.torch_free_references if golden else suite.references,
                                f"{fam.title} property references")
        refs = make_refs()
    except (ImportError, EquivError) as e:
        return not_run(f"cannot import what the {suite.title} properties need ({first_line(e)})")
    progress(f"{suite.title} properties (budget from {getattr(refs, 'name', type(refs).__name__)})")
    return run(refs, progress=progress, **({} if examples is None else {"examples_per_property": examples}))


def reference_loader(fam: Family, golden: bool, golden_dir: Path):
    """(path, dtype) -> runner: the family's default reference live, or its golden recordings."""
    if golden:
        from equiv.golden import GoldenRunner

        return lambda path, dtype: GoldenRunner(golden_dir / Path(path).name
                                                / f"{fam.default_reference}-{dtype}")
    from equiv.references import load_reference

    return lambda path, dtype: load_reference(fam.default_reference, path, dtype, family=fam)


def recorded_loader(fam: Family, recorded: str, golden: bool, golden_dir: Path):
    """(path, dtype) -> runner for a check against a GPU recording of `recorded` (one of
    fam.recorded_references): float32 replays fixtures/golden/<fixture>/<recorded>-float32, the
    float64 oracle is the family's default reference's, live or golden as the run is."""
    from equiv.golden import GoldenRunner

    oracle = reference_loader(fam, golden, golden_dir)

    def load(path, dtype):
        if dtype != "float32":
            return oracle(path, dtype)
        runner = GoldenRunner(golden_dir / Path(path).name / f"{recorded}-{dtype}")
        if fam.recorded_references[recorded] != dtype:  # judged at the rounding it really computes at
            runner.judged_precision = fam.recorded_references[recorded]
        runner.regenerate = fam.notes.get(f"record {recorded}")
        return runner

    return load


def loader_for(fam: Family, recorded: str, golden: bool, golden_dir: Path):
    return recorded_loader(fam, recorded, golden, golden_dir) if recorded else \
        reference_loader(fam, golden, golden_dir)


def _check_one(name: str, path: str, golden: bool, port_spec: str, family_name: str,
               recorded: str = "") -> FixtureOutcome:
    """Worker-process entry: everything re-resolved from names (nothing unpicklable crosses)."""
    from equiv.families import family
    from equiv.fixtures import fixtures_root
    from equiv.ports import resolve_port

    compile_cache.enable()
    fam = family(family_name)
    load_ref = loader_for(fam, recorded, golden, fixtures_root() / "golden")
    return check_fixture(name, Path(path), resolve_port(port_spec, fam), load_ref,
                         progress=lambda msg: print(f"equiv: {msg}", file=sys.stderr, flush=True),
                         unpadded=bool(recorded))


def _suite_one(family_name: str, golden: bool, examples: int | None) -> tuple[dict, float]:
    """Worker-process entry for a family's property suite: (its result, seconds)."""
    from equiv.families import family

    compile_cache.enable()
    t0 = time.perf_counter()
    result = run_property_suite(family(family_name), golden, examples,
                                progress=lambda msg: print(f"equiv: {msg}", file=sys.stderr, flush=True))
    return result, time.perf_counter() - t0


def _check_in_processes(targets, families, golden, port_spec, workers, examples, progress):
    """Checkpoints and property suites (None: not run) fanned out over one pool of processes
    (spawned: JAX and torch threads do not survive fork), the suites first since they are the
    longest jobs. Results come back in the input order, so reports do not depend on the worker
    count. Returns (outcomes, {family name: (suite result, seconds)})."""
    import concurrent.futures as cf
    import multiprocessing as mp

    progress(f"checking {len(targets)} checkpoints and {len(families)} property suites in {workers} "
             "processes")
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        suites = {fam.name: pool.submit(_suite_one, fam.name, golden, examples) for fam in families}
        futures = [pool.submit(_check_one, name, str(path), golden, port_spec, fam.name, recorded)
                   for name, path, fam, recorded in targets]
        return [f.result() for f in futures], {k: f.result() for k, f in suites.items()}


def default_workers() -> int:
    """Processes for the main job: the machine's cores, at most 4 (each holds JAX and torch, ~1.5 GB).
    Two cores check the bundled fixtures and suites in about half the single-process time."""
    return max(1, min(4, os.cpu_count() or 1))


def _targets(fixture_names: list[str] | None, checkpoints: list[Path] | None, golden: bool, port_spec: str):
    """[(report name, directory, family, recorded reference or "")]: the named (else, with no
    checkpoint either, every bundled fixture the port is registered for: all for `builtin`, its own
    family's for a family's named port), verified against its manifest; each bundled fixture again
    as "<fixture>@<reference>" for every recording of one of its family's recorded_references; then
    each checkpoint directory given by path."""
    from equiv.fixtures import fixtures_root, list_fixtures, verify_fixture

    checkpoints = [Path(c) for c in checkpoints or []]
    if golden and checkpoints:
        raise EquivError(f"--golden: expected bundled fixtures only (recordings exist for those), got "
                         f"checkpoint path(s) {[str(c) for c in checkpoints]}; run them without --golden")
    for c in checkpoints:
        require_checkpoint_dir(c)
    names = fixture_names or ([] if checkpoints else [n for n in list_fixtures() if n != "golden"])
    targets = [(name, path, family_of_checkpoint(path), "") for name in names
               for path in [verify_fixture(name)]]
    if not fixture_names and port_spec != "builtin" and ":" not in port_spec:
        targets = [t for t in targets if port_spec in t[2].ports]
    targets += [(f"{name}@{ref}", path, fam, ref) for name, path, fam, _ in list(targets)
                for ref in fam.recorded_references
                if (fixtures_root() / "golden" / name / f"{ref}-float32.json").is_file()]
    taken = {t[0] for t in targets}
    for c in checkpoints:  # a report directory per checkpoint, named after it, never clobbered
        name = c.resolve().name or "checkpoint"
        while name in taken:
            name += "_"
        taken.add(name)
        targets.append((name, c, family_of_checkpoint(c), ""))
    return targets


def run_main_job(fixture_names: list[str] | None, out_dir: Path, golden: bool = False,
                 port_spec: str = "builtin", properties: bool = True, progress=print, workers: int = 1,
                 allow_not_run: bool = False, property_examples: int | None = None,
                 checkpoints: list[Path] | None = None) -> int:
    """Returns the exit code (module docstring). `checkpoints`: directories of any checkpoint the
    port and the reference load, checked like a fixture (layer-wise both modes, decode match)."""
    from equiv.fixtures import fixtures_root
    from equiv.ports import resolve_port

    t0 = time.perf_counter()
    cache = compile_cache.enable()
    if cache:
        progress(f"XLA compilation cache: {cache} (SSM_EQUIV_JAX_CACHE_DIR='' turns it off)")
    targets = _targets(fixture_names, checkpoints, golden, port_spec)
    families = list({fam.name: fam for _, _, fam, _ in targets}.values())
    ports = {fam.name: resolve_port(port_spec, fam) for fam in families}  # a bad --port fails before any work
    suite_families = families if properties else []
    if workers > 1 and len(targets) + len(suite_families) > 1:
        outcomes, ran = _check_in_processes(targets, suite_families, golden, port_spec, workers,
                                            property_examples, progress)
    else:
        outcomes = [check_fixture(name, path, ports[fam.name],
                                  loader_for(fam, recorded, golden, fixtures_root() / "golden"), progress,
                                  unpadded=bool(recorded))
                    for name, path, fam, recorded in targets]
        ran = {}
        for fam in suite_families:  # each family's suite once, whatever number of its checkpoints ran
            t_suite = time.perf_counter()
            result = run_property_suite(fam, golden, property_examples, progress)
            ran[fam.name] = result, time.perf_counter() - t_suite
    timings = {o.name: round(o.seconds, 2) for o in outcomes}
    suites = {}
    for fam in families:
        result, seconds = ran.get(fam.name, (not_run("disabled with --no-properties"), 0.0))
        suites[fam.properties.title] = result
        timings[f"{fam.name}_properties_s"] = round(seconds, 2)
    timings["total_s"] = round(time.perf_counter() - t0, 2)
    installed = tested_versions.installed_versions()
    provenance = {"port": port_spec, "golden": golden, "versions": installed,
                  "untested_versions": tested_versions.untested(installed),
                  "reference": next((o.layerwise["accumulated"].reference for o in outcomes
                                     if "accumulated" in o.layerwise), {})}
    verdict = overall_verdict(outcomes, suites, allow_not_run)
    write_check_reports(outcomes, suites, provenance, out_dir, timings, verdict)
    print(summary_table(outcomes, suites))
    print(versions_line(provenance))
    print(f"\nverdict: {verdict.upper()}  ({timings['total_s']:.0f} s; reports in {out_dir}/)")
    if any(o.error for o in outcomes):
        return EXIT_INPUT  # an input could not be checked at all: a usage/input error, not a verdict
    return {"equivalent": EXIT_EQUIVALENT, "divergent": EXIT_DIVERGENT, "incomplete": EXIT_NOT_RUN}[verdict]
