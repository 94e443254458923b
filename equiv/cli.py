"""The `equiv` command line (console script `equiv` -> `equiv.cli:main`).

    equiv diff CHECKPOINT [--port NAME|module:attr] [--reference NAME|module:attr]
               [--dtype float32|bfloat16] [--seq-len N] [--batch N] [--seed N]
               [--mode accumulated|isolated] [--budget X] [--out DIR] [--mesh MODEL|DATAxMODEL]
               [--stream [--decode-steps N]]

Exit codes: 0 equivalent, 1 divergence found, 2 usage or input error (one line on stderr, no
traceback; also when no tap could be compared at all, and for any other exception: what failed,
what was expected, what to do). `equiv --debug COMMAND ...` prints the traceback as well.

Subcommands are argparse subparsers. Another module adds one by defining
`register(subparsers)`, which calls `subparsers.add_parser(...)` and sets `func=handler` with
`handler(args, progress: Progress) -> int`; list the module in SUBCOMMAND_MODULES.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from equiv.errors import EquivError, first_line, one_line, quote, quote_path
from equiv.inputs import require_checkpoint_dir
from equiv.ports import check_loaded_model

SUBCOMMAND_MODULES = ("equiv.cli_check",)  # `equiv check` (the main job, also on any checkpoint)
EXIT_EQUIVALENT, EXIT_DIVERGENT, EXIT_USAGE = 0, 1, 2


class UsageError(EquivError):
    """A command line argparse rejected."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is an exception main() turns into one line (argparse would print the
    usage block and exit)."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message}")


# ---------------------------------------------------------------------------------------------
# progress on stderr


class Progress:
    """Which stage is running, on stderr. Every stage start is one line; on a TTY the current line
    also shows a live elapsed-time counter (after the first 2 s), so long stages visibly progress."""

    def __init__(self, stream=None, tty: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self._stage: str | None = None
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def stage(self, name: str) -> None:
        name = one_line(name)  # it may name a path or a plug-in: one line, no escape sequences
        with self._lock:
            self._finish_line()
            self._stage, self._t0 = name, time.monotonic()
            self.stream.write(f"equiv: {name} ..." if self.tty else f"equiv: {name}\n")
            self.stream.flush()
        if self.tty and self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    def _finish_line(self) -> None:
        if self.tty and self._stage is not None:
            self.stream.write(f"\r\033[Kequiv: {self._stage} ... {time.monotonic() - self._t0:.1f}s\n")

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                elapsed = time.monotonic() - self._t0
                if self._stage is not None and elapsed >= 2:
                    self.stream.write(f"\r\033[Kequiv: {self._stage} ... {elapsed:.0f}s")
                    self.stream.flush()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            self._finish_line()
            self._stage = None
            self.stream.flush()


# ---------------------------------------------------------------------------------------------
# loading


def random_ids(vocab: int, batch: int, seq_len: int, seed: int) -> np.ndarray:
    """(b, l) int32 token ids, uniform in [0, vocab), from numpy's Generator seeded with `seed`."""
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq_len)).astype(np.int32)


def checkpoint_family(checkpoint: Path, port: str, reference: str | None):
    """The checkpoint's family from its config.json. An architecture no family knows is still
    verifiable when both the port and the reference are `module:attr` plug-ins: then None."""
    from equiv.families import UnknownFamily, family_of_checkpoint

    try:
        return family_of_checkpoint(checkpoint)
    except UnknownFamily:
        if ":" in port and reference is not None and ":" in reference:
            return None
        raise


def load_port(spec: str, checkpoint: Path, dtype: str, family):
    from equiv.ports import resolve_port

    return resolve_port(spec, family).load(checkpoint, dtype)


def load_reference(spec: str | None, checkpoint: Path, dtype: str, family):
    """A name the checkpoint's family lists (None: its default) or a `module:attr` plug-in
    (equiv/references.py)."""
    from equiv.references import load_reference as load

    return load(spec, checkpoint, dtype, family=family)


# ---------------------------------------------------------------------------------------------
# equiv diff


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {quote(text)}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {quote(text)}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _budget(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {quote(text)}")
    return v


def _mesh(text: str) -> tuple[int, int]:
    """'8' -> (data 1, model 8); '2x4' -> (data 2, model 4)."""
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(re.fullmatch(r"[0-9]{1,4}", p) and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"expected MODEL or DATAxMODEL, integers >= 1 (8, 2x4), got "
                                         f"{quote(text)}")
    return (1, int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))


def _budget_help() -> str:
    """--budget's help, read from the tolerance table so the two cannot drift apart."""
    from equiv.compare import tolerance

    def b(dtype, key):
        return f"{tolerance(dtype, key).budget:g}"

    return ("error-budget ratio (default: equiv/compare.py TOLERANCES for --dtype and --mode: float32 "
            f"{b('float32', 'error_budget_accumulated')} accumulated, {b('float32', 'error_budget')} "
            f"isolated; bfloat16 {b('bfloat16', 'error_budget_accumulated')}, "
            f"{b('bfloat16', 'error_budget')}). The max-error guard (float32 "
            f"{b('float32', 'max_error_guard_accumulated')} accumulated, {b('float32', 'max_error_guard')} "
            "isolated) scales with it")


def register_diff(subparsers) -> None:
    p = subparsers.add_parser("diff", help="layer-wise diff of a port against the reference and the oracle",
                              description="Compare every tap of the port with the reference (in --dtype) "
                                          "against the float64 oracle; report the first divergence.")
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (config.json + weights)")
    p.add_argument("--port", default="builtin",
                   help="a port the checkpoint's family lists, or module:attr (default: builtin, the "
                        "project's own port of that family)")
    p.add_argument("--reference", default=None,
                   help="a reference the checkpoint's family lists (Mamba-2: transformers, mamba_ssm; "
                        "Mamba-1: transformers), or module:attr (default: the family's first)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--seq-len", type=_positive_int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--batch", type=_positive_int, default=2, help="sequences (default 2)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random token ids (default 0)")
    p.add_argument("--mode", default="accumulated", choices=("accumulated", "isolated"))
    p.add_argument("--budget", type=_budget, default=None, help=_budget_help())
    p.add_argument("--out", type=Path, default=None, help="write report.json/.md/.html and ratio.png here")
    p.add_argument("--mesh", type=_mesh, default=None, metavar="MODEL|DATAxMODEL",
                   help="run the built-in Mamba-2 port sharded over a device mesh (heads over MODEL, the "
                        "batch over DATA; docs/sharding.md) and compare it with the unsharded port too, "
                        "layer-wise and in greedy decode (reports of that under OUT/vs-unsharded)")
    p.add_argument("--stream", action="store_true",
                   help="run layer by layer, one layer's weights per side resident (automatic when the "
                        "in-memory diff would not fit in memory; docs/streaming.md)")
    p.add_argument("--decode-steps", type=_positive_int, default=0, metavar="N",
                   help="with streaming: also the teacher-forced decode match of each sequence's last N "
                        "tokens")
    p.set_defaults(func=run_diff)


def run_diff(args, progress: Progress) -> int:
    from equiv.layerwise import run_layerwise
    from equiv.memory import require_memory
    from equiv.report import prepare_out_dir, terminal_table, write_reports
    from equiv.report_wording import coverage_phrase

    require_checkpoint_dir(args.checkpoint)
    if args.out is not None:
        prepare_out_dir(args.out)
    fam = checkpoint_family(args.checkpoint, args.port, args.reference)
    from equiv.stream.cli import run_streamed_diff, streaming_wanted
    from equiv.stream.memory import peak_rss_bytes

    if streaming_wanted(args, fam, progress.stage):  # --stream, or an in-memory diff too big to fit
        return run_streamed_diff(args, fam, progress)
    progress.stage(f"loading port {args.port}{f' for {fam.title}' if fam else ''} ({args.dtype})")
    model = load_port(args.port, args.checkpoint, args.dtype, fam)
    check_loaded_model(model, args.port)  # protocol v1: a missing member is one line, not a traceback
    unsharded = None
    sharding = None
    if args.mesh is not None:  # placed before the reference loads: a mesh that cannot run fails at once
        if fam is None or not fam.sharding:
            from equiv.families import all_families

            have = [f.title for f in all_families() if f.sharding]
            raise UsageError(f"--mesh: expected a checkpoint of a family with a sharded port "
                             f"({', '.join(have) or 'none'}), got "
                             f"{fam.title if fam else 'a plug-in run with no family'}")
        sharding = importlib.import_module(fam.sharding)
        unsharded, model = model, sharding.shard(model, *args.mesh, port=args.port)
    require_memory(model, args.port, args.batch, args.seq_len,
                   f"--batch {args.batch} --seq-len {args.seq_len}")
    ids = random_ids(int(model.vocab_size), args.batch, args.seq_len, args.seed)
    progress.stage(f"loading reference {args.reference or fam.default_reference} ({args.dtype} and the "
                   "float64 oracle)")
    reference = load_reference(args.reference, args.checkpoint, args.dtype, fam)
    oracle = load_reference(args.reference, args.checkpoint, "float64", fam)
    result = run_layerwise(model, reference, oracle, ids, None, mode=args.mode, dtype=args.dtype,
                           budget=args.budget, progress=progress.stage, seed=args.seed)
    result.settings["peak_rss_bytes"] = peak_rss_bytes()
    progress.close()
    sys.stdout.write(terminal_table(result))  # first, so a failing write still shows the result
    sys.stdout.flush()
    if args.out is not None:
        progress.stage(f"writing reports to {args.out}")
        write_reports(result, args.out)
        progress.close()
    if result.verdict == "inconclusive":
        raise EquivError(f"no tap could be compared: {coverage_phrase(result)}; "
                         + (result.notes[-1] if result.notes else "see the table"))
    if sharding is not None:
        if not sharding.diff_against_unsharded(model, unsharded, oracle, ids, args, progress):
            return EXIT_DIVERGENT
    return EXIT_DIVERGENT if result.verdict == "divergent" else EXIT_EQUIVALENT


# ---------------------------------------------------------------------------------------------
# main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="equiv", description="Numerical-equivalence verification of JAX ports of "
                                               "PyTorch state-space models.")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the full traceback after the one-line message")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_diff(sub)
    for name in SUBCOMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(sub)
    return parser


def os_error_line(e: OSError) -> str:
    """An OSError no layer named, as one line: what failed, on which path (quoted)."""
    where = f"{quote_path(e.filename)}: " if e.filename is not None else ""
    return one_line(f"{where}{e.strerror or type(e).__name__}")


def unexpected_error_line(e: BaseException, command: str | None) -> str:
    """One line for an exception no layer turned into an EquivError: what failed and what to do."""
    where = f"equiv {command}" if command else "equiv"
    return (f"equiv: error: {where} failed with {type(e).__name__}: {first_line(e)} (expected to finish "
            "or to name a bad input; rerun with `equiv --debug ...` for the traceback, and report it if the "
            "input was valid)")


def main(argv: list[str] | None = None) -> int:
    progress = Progress()
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # known before parsing (a parse-time failure honours it), and allowed
    argv = [a for a in argv if a != "--debug"]  # anywhere on the line, not only before COMMAND
    command = None
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help / --version: argparse has printed, exit as it asks
            return int(e.code or 0)
        command = args.command
        from equiv.kblock import requested_layout  # here: imports JAX, which --help need not
        requested_layout()  # SSM_EQUIV_WEIGHT_LAYOUT checked before any work, not per checkpoint
        return int(args.func(args, progress))
    except (EquivError, OSError) as e:
        progress.close()
        message = os_error_line(e) if isinstance(e, OSError) else one_line(str(e) or type(e).__name__)
        own_prefix = isinstance(e, UsageError) and message.startswith("equiv")
        print(message if own_prefix else f"equiv: error: {message}", file=sys.stderr)
        if debug:
            traceback.print_exc()
        return EXIT_USAGE
    except KeyboardInterrupt:
        progress.close()
        print("equiv: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the promise: one line and exit 2, never a bare traceback
        progress.close()
        print(unexpected_error_line(e, command), file=sys.stderr)
        if debug:
            traceback.print_exc()
        return EXIT_USAGE
    finally:
        progress.close()


if __name__ == "__main__":
    sys.exit(main())
