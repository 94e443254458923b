"""The layer-streamed run: the same LayerwiseResult as equiv.layerwise.run_layerwise, one stage at a
time (equiv/stream/protocol.py says what a stage is).

For each stage, in order: the oracle's copy is loaded, run on its own carry and dropped, then the
reference's, then the port's (accumulated mode: on its own carry; isolated mode: on the oracle's
taps of this stage and the one before, which is why the oracle goes first). The stage's taps are
then compared with the very functions the in-memory run uses (alignment, compare_tap, first
divergence, explanations: equiv/layerwise.py), and dropped; only the comparisons, the carries and
what the next stage or the decode match needs stay.

The decode match streams too, teacher-forced: each stage runs the prompt and then every decode step
through its own small cache before the next stage starts, and the head's step logits are compared
with the reference's and the oracle's full-forward logits (equiv.decode.match_teacher_forced).
Free-running greedy generation does not stream: each new token needs every layer again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from equiv.compare import max_error_guard
from equiv.decode import DecodeResult, match_teacher_forced, real_prompt_lengths
from equiv.errors import EquivError
from equiv.layerwise import (
    ISOLATED_APPROXIMATION,
    LayerwiseResult,
    _in_compute_dtype,
    _validate,
    align_taps,
    assemble_result,
    compare_aligned,
    one_sided_taps,
)
from equiv.memory import human
from equiv.ports import TapUnavailable
from equiv.stream.memory import peak_rss_bytes
from equiv.stream.protocol import check_sides


@dataclass
class StageRecord:
    label: str
    seconds: float
    sides: int  # how many sides ran it
    peak_rss_bytes: int  # the process's peak so far, after this stage


@dataclass
class StreamedRun:
    result: LayerwiseResult
    decode: DecodeResult | None
    stages: list[StageRecord] = field(default_factory=list)


def _drop(loaded) -> None:
    """Release a loaded stage's weights now (a stage may hold them beyond its last reference)."""
    release = getattr(loaded, "close", None)
    if callable(release):
        release()


def run_streamed(port, reference, oracle, ids, mask=None, mode: str = "accumulated", dtype: str = "float32",
                 budget: float | None = None, decode_prompt_len: int | None = None,
                 progress: Callable[[str], None] | None = None, seed: int | None = None) -> StreamedRun:
    """Compare the streamed `port` with `reference` (in `dtype`) against `oracle` (float64), stage by
    stage. With `decode_prompt_len` P, also the teacher-forced decode match of the tokens after the
    first P of `ids`. `progress(line)` hears one line per stage."""
    budget = _validate(mode, dtype, budget)
    say = progress or (lambda _line: None)
    ids = np.asarray(ids)
    check_sides(port, reference, oracle)
    notes = [ISOLATED_APPROXIMATION] if mode == "isolated" else []
    b, l = ids.shape[:2]
    if decode_prompt_len is not None and not 1 <= decode_prompt_len < l:
        raise EquivError(f"decode: expected a prompt of 1 to {l - 1} tokens (of l={l}), got "
                         f"{decode_prompt_len}")

    order, port_only, reference_only = align_taps(list(port.tap_names), list(reference.tap_names))
    one_sided = one_sided_taps(port_only, reference_only)
    rank = {name: i for i, name in enumerate(order)}
    guard = max_error_guard(dtype, budget, mode)
    comparisons = {}
    carry = {"port": ids, "reference": ids, "oracle": ids}
    decoding = decode_prompt_len is not None
    if decoding:
        P = decode_prompt_len
        prompt_mask = None if mask is None else np.asarray(mask)[:, :P]
        steps = [ids[:, t] for t in range(P, l - 1)]  # the last token predicts beyond the sequence
        dec = {"port": (ids[:, :P], steps), "reference": (ids[:, :P], steps)}
        full_logits = {}
    isolated_ok = True  # until a port stage says it cannot run isolated mode
    previous_fed: dict[str, np.ndarray] = {}
    records = []
    for p_stage, r_stage, o_stage in zip(port.stages, reference.stages, oracle.stages, strict=True):
        t0 = time.perf_counter()
        sides = 0
        taps = {}
        for side, stage in (("oracle", o_stage), ("reference", r_stage)):
            loaded = stage.load()
            carry[side], taps[side] = loaded.forward(carry[side], mask)
            if decoding and side == "reference":
                dec[side] = loaded.decode(*dec[side], prompt_mask)
            _drop(loaded)
            del loaded
            sides += 1
        fed = ({n: _in_compute_dtype(v, dtype) for n, v in taps["oracle"].items()}
               if mode == "isolated" else {})
        if mode == "accumulated" or isolated_ok or decoding:
            loaded = p_stage.load()
            if mode == "accumulated":
                carry["port"], taps["port"] = loaded.forward(carry["port"], mask)
            elif isolated_ok:
                taps["port"] = _isolated(loaded, ids, mask, {**previous_fed, **fed}, notes)
                isolated_ok = taps["port"] is not None
            if decoding:
                dec["port"] = loaded.decode(*dec["port"], prompt_mask)
            _drop(loaded)
            del loaded
            sides += 1
        port_taps = taps.get("port") if (mode == "accumulated" or isolated_ok) else None
        names = sorted(set(p_stage.tap_names) | set(r_stage.tap_names), key=lambda n: rank.get(n, len(rank)))
        for name in names:
            comparisons[name] = compare_aligned(name, one_sided, port_taps, taps["reference"], taps["oracle"],
                                                dtype, budget, guard)
        if decoding:
            for side in ("reference", "oracle"):
                if "logits" in taps[side]:
                    full_logits[side] = taps[side]["logits"][:, P - 1:l - 1]
        previous_fed = fed
        del taps, fed
        rss = peak_rss_bytes()
        records.append(StageRecord(p_stage.label, time.perf_counter() - t0, sides, rss))
        say(f"{p_stage.label}: {sides} sides, {records[-1].seconds:.1f} s, peak RSS {human(rss)}")

    missing = [n for n in order if n not in comparisons]
    if missing:  # declared by a side's tap_names but by none of its stages
        raise EquivError(f"streamed sides: expected every tap in some stage, got {missing[:5]} in none")
    result = assemble_result([comparisons[n] for n in order], port_only, reference_only, mode, dtype, budget,
                             notes, port.info(), reference.provenance(), oracle.provenance(), ids, mask, seed)
    decode = None
    if decoding:
        if set(full_logits) != {"reference", "oracle"}:
            raise EquivError("streamed decode: expected a 'logits' tap from the reference and the oracle, "
                             f"got it from {sorted(full_logits) or 'neither'}")
        steps_of = lambda side: np.stack([dec[side][0], *dec[side][1]], axis=1)  # noqa: E731  b T v
        decode = match_teacher_forced(steps_of("port"), steps_of("reference"), full_logits["reference"],
                                      full_logits["oracle"], real_prompt_lengths(mask, P, b), dtype)
    return StreamedRun(result, decode, records)


def _isolated(loaded, ids, mask, fed: dict, notes: list[str]) -> dict | None:
    """The port stage's isolated taps, or None (and a note) when it cannot run isolated mode."""
    try:
        if not callable(getattr(loaded, "forward_isolated", None)):
            raise TapUnavailable("its layer runners have no forward_isolated")
        return loaded.forward_isolated(ids, mask, fed)
    except TapUnavailable as e:
        notes.append(f"the port cannot run isolated mode: {e}")
        return None
