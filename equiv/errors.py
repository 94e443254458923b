"""The exceptions the library raises for bad input. All are ValueError subclasses, so callers that
only know ValueError still catch them; the CLI turns each into one line and exit code 2."""


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


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message for a one-line error: its first non-blank line, at most `limit`
    characters, or "(no message)"."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else "(no message)"


def format_mismatches(what: str, problems: list[str]) -> str:
    """One message listing every mismatch at once (chex-style), so a user fixes them in one go."""
    return f"{what}: " + "; ".join(problems)
