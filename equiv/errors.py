"""The exceptions the library raises for bad input. All are ValueError subclasses, so callers that
only know ValueError still catch them; the CLI turns each into one line and exit code 2. Also the
helpers every message uses to show an untrusted string (quote, quote_path, one_line)."""

import os
import unicodedata


class EquivError(ValueError):
    """Base class: the input was not what the library expected. The message says what was expected
    and what came."""


class ShapeError(EquivError):
    """Array shapes or dtypes disagree with each other or with the config."""


class ConfigError(EquivError):
    """A model config contradicts itself or asks for a feature the port does not implement."""


class UnsupportedFeatureError(ConfigError):
    """A valid config asks for a feature the port does not implement; the message lists each by name."""


class CheckpointError(EquivError):
    """A checkpoint is missing, corrupt, unsafe, or does not match its config."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint that `torch.load(weights_only=True)` refused: loading it would have
    constructed arbitrary objects (run code). Nothing from it was executed."""


class DtypeError(EquivError):
    """A dtype argument the loader does not support (the checkpoint's own tensor dtypes are
    CheckpointError)."""


class TokenRangeError(EquivError):
    """Token ids outside [0, vocab_size), or an empty input."""


class FixtureIntegrityError(EquivError):
    """A fixture file's sha256 does not match the manifest."""


class ReferenceChanged(EquivError):
    """The installed reference library does not have the code this suite knows how to control (a
    release moved it): a verdict from it could come from the wrong code path, so none is computed.
    The message names the version, what broke, the tested range and how to pin."""


class ReportWriteError(EquivError):
    """The report directory cannot be written."""


def quote(value, keep: int = 40) -> str:
    """An untrusted string (a key or name from a file, a plug-in's message) as a message shows it:
    repr-style, so a newline or a terminal escape cannot cut the line or reach the terminal raw,
    and shortened in the middle to `keep` characters each side, so a huge one gives a short line."""
    try:
        text = repr(value if isinstance(value, str) else str(value))
    except Exception:  # noqa: BLE001 - a hostile __str__ / __repr__
        text = f"<{type(value).__name__} that cannot be shown>"
    if len(text) > 2 * keep + 5:
        text = f"{text[:keep]}...{text[-keep:]}"
    return text


def bare_or_quoted(name, keep: int = 40) -> str:
    """A name from a file (a config key) as it reads, when it is short plain printable text; else
    `quote`d. Lists of ordinary keys stay readable, a hostile one cannot reach the terminal raw."""
    plain = isinstance(name, str) and name and name.isprintable() and name.strip() == name
    if plain and len(name) <= 2 * keep:
        return name
    return quote(name, keep)


def clip(value, keep: int = 40) -> str:
    """`quote` without the quotes: for a message's tail (a library's or plug-in's own words)."""
    return quote(value, keep)[1:-1]


def quote_path(path) -> str:
    """A path as a message shows it: quoted like `quote`, with more kept (a user's own paths are
    long legitimately: a Hugging Face cache snapshot is about 130 characters)."""
    try:
        text = os.fsdecode(path) if isinstance(path, str | bytes | os.PathLike) else str(path)
    except Exception:  # noqa: BLE001
        text = str(path)
    return quote(text, keep=80)


_UNSAFE = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")  # controls, bidi/format, separators, unassigned


def _escape(c: str) -> str:
    return c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in _UNSAFE else c


def one_line(message: str, limit: int = 2000) -> str:
    """The last guard before a message reaches the terminal: control, format (bidi override) and
    separator characters escaped (so the line stays one line, reads in order, and no escape sequence
    runs), shortened in the middle past `limit`."""
    text = str(message)
    if not text.isprintable():
        text = "".join(map(_escape, text))
    if len(text) > limit:
        text = f"{text[:limit // 2]} ... {text[-limit // 2:]}"
    return text


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message for a one-line error: its first non-blank line, at most `limit`
    characters, or "(no message)". Control characters are escaped (it may come from a plug-in)."""
    try:
        text = str(e).strip()
    except Exception:  # noqa: BLE001 - a hostile __str__
        text = ""
    return one_line(text.splitlines()[0], limit) if text else "(no message)"


def format_mismatches(what: str, problems: list[str]) -> str:
    """One message listing every mismatch at once (chex-style), so a user fixes them in one go."""
    return f"{what}: " + "; ".join(problems)
