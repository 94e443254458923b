"""`equiv diff --stream`: the layer-wise diff of a checkpoint streamed layer by layer, and when
`equiv diff` streams by itself (an in-memory diff that would not fit in memory).

It verifies the family's built-in port against its default reference (the pair its
`Family.streaming` factories stream), on the same random ids as the in-memory diff, printing one line
per stage; `--decode-steps N` adds the teacher-forced decode match of the last N tokens of each
sequence. Its report is the in-memory diff's, plus `settings.streamed` (and decode.json with --out).
"""

from __future__ import annotations

import json
import sys

from equiv.errors import EquivError, one_line
from equiv.families import import_attr

EXIT_EQUIVALENT, EXIT_DIVERGENT = 0, 1


def _streamable(fam, args) -> str | None:
    """Why this diff cannot stream, or None."""
    if fam is None or not fam.streaming:
        return (f"a checkpoint of a family with layer runners (Family.streaming), got "
                f"{fam.title if fam else 'an architecture no family reads'}")
    if args.port != "builtin":
        return f"--port builtin (the {fam.title} port its layer runners stream), got {args.port!r}"
    if getattr(args, "mesh", None) is not None:
        return "no --mesh (the sharded port runs in memory)"
    if (args.reference or fam.default_reference) != fam.default_reference:
        return f"--reference {fam.default_reference} (what its layer runners stream), got {args.reference!r}"
    return None


def _port_side(fam, args, reader):
    return import_attr(fam.streaming["port"], f"{fam.title} layer-streamed port")(
        args.checkpoint, args.dtype, reader=reader)


def streaming_wanted(args, fam, say) -> bool:
    """--stream; else True, after saying why, when the in-memory diff would not fit in memory and
    this diff can stream; else False (then --decode-steps, which streams only, is refused)."""
    from equiv.io.layer_reader import TensorIndex
    from equiv.stream.memory import in_memory_need, streamed_need, streaming_reason

    if args.stream:
        return True
    if _streamable(fam, args) is None:
        try:
            reader = TensorIndex(args.checkpoint)
            side = _port_side(fam, args, reader)
            reason = streaming_reason(
                in_memory_need(reader.nbytes(itemsize=4), side, args.port, args.batch, args.seq_len),
                streamed_need(side, args.batch, args.seq_len))
        except (EquivError, OSError):  # not streamable (a .bin, a bad header): the in-memory diff says why
            reason = None
        if reason:
            say(reason)
            return True
    if args.decode_steps:
        raise EquivError("--decode-steps: expected --stream (the teacher-forced decode match runs layer by "
                         "layer; `equiv check` runs the in-memory greedy one)")
    return False


def run_streamed_diff(args, fam, progress) -> int:
    """The diff of `equiv diff`, streamed (equiv/stream/driver.py). Exit 0, 1 or an EquivError."""
    from equiv.cli import random_ids
    from equiv.io.checkpoint_files import preflight
    from equiv.io.layer_reader import TensorIndex
    from equiv.references import DEFAULT_THREADS
    from equiv.report import terminal_table, write_reports
    from equiv.report_wording import coverage_phrase, jsonable
    from equiv.stream.driver import run_streamed
    from equiv.stream.memory import peak_rss_bytes, require_streamed_memory

    why = _streamable(fam, args)
    if why:
        raise EquivError(f"--stream: expected {why}")
    steps = args.decode_steps
    if steps and not steps < args.seq_len:
        raise EquivError(f"--decode-steps: expected fewer steps than --seq-len {args.seq_len} (a prompt of "
                         f"at least one token), got {steps}")
    preflight(args.checkpoint)  # what the reference library opens, bounded first
    reader = TensorIndex(args.checkpoint)
    reference_name = fam.default_reference
    progress.stage(f"streaming {fam.title} layer by layer from {reader.source}: port builtin, reference "
                   f"{reference_name} ({args.dtype}) and the float64 oracle, one layer of each resident")
    port = _port_side(fam, args, reader)
    require_streamed_memory(port, args.batch, args.seq_len)
    load_reference = import_attr(fam.streaming["reference"], f"{fam.title} layer-streamed reference")
    reference = load_reference(args.checkpoint, args.dtype, reader=reader, threads=DEFAULT_THREADS)
    oracle = load_reference(args.checkpoint, "float64", reader=reader, threads=DEFAULT_THREADS)
    ids = random_ids(int(port.vocab_size), args.batch, args.seq_len, args.seed)
    progress.close()  # from here one line per stage, each when its stage is done

    def say(line: str) -> None:
        progress.stream.write(f"equiv: {one_line(line, 300)}\n")
        progress.stream.flush()

    run = run_streamed(port, reference, oracle, ids, None, mode=args.mode, dtype=args.dtype,
                       budget=args.budget, decode_prompt_len=args.seq_len - steps if steps else None,
                       progress=say, seed=args.seed)
    result = run.result
    result.settings["peak_rss_bytes"] = peak_rss_bytes()
    result.settings["streamed"] = {"stages": len(run.stages), "decode_steps": steps,  # timings: on stderr
                                   "weights": f"{reader.source}, read tensor by tensor"}
    sys.stdout.write(terminal_table(result))
    if run.decode is not None:
        d = run.decode
        sys.stdout.write(f"decode, teacher-forced ({steps} steps x {len(d.total_steps)} rows, greedy choices "
                         f"implied by the step logits): {d.verdict.upper()}: {d.reason}\n")
    sys.stdout.flush()
    if args.out is not None:
        progress.stage(f"writing reports to {args.out}")
        write_reports(result, args.out)
        if run.decode is not None:
            body = jsonable({"schema": "ssm-equiv/teacher-forced-decode", "schema_version": 1,
                             **run.decode.to_dict()})
            (args.out / "decode.json").write_text(json.dumps(body, indent=2, allow_nan=False) + "\n")
        progress.close()
    if result.verdict == "inconclusive":
        raise EquivError(f"no tap could be compared: {coverage_phrase(result)}; "
                         + (result.notes[-1] if result.notes else "see the table"))
    failed = result.verdict == "divergent" or (run.decode is not None and run.decode.verdict != "pass")
    return EXIT_DIVERGENT if failed else EXIT_EQUIVALENT
