"""Will a run fit in memory? Checked before anything of its size is allocated.

Every size a user controls (`--batch`, `--seq-len`, a config's `chunk_size`, a port's declared
decode lengths) multiplies what the port, the reference and the oracle allocate; unchecked, a
large one ends in an allocation failure deep inside numpy, XLA or torch (or the kernel's OOM
killer). The port knows its own forward: a loaded model may provide `memory_estimate(batch,
seq_len) -> int`, the bytes of its largest forward (equiv/ports.py). The run needs that for the
port, again for the float32 reference (the same computation) and twice for the float64 oracle:
RUN_FACTOR times it. A model without the member is bounded by what the harness itself holds for
any port: the logits of every side.

The limit is the machine's available memory (MemAvailable in /proc/meminfo; elsewhere the
physical memory), lowered by SSM_EQUIV_MAX_MEMORY (bytes, or with a K/M/G/T suffix) when set.
"""

from __future__ import annotations

import os
import re

from equiv.errors import EquivError, clip, quote
from equiv.io.bounded import read_bytes

RUN_FACTOR = 4
"""The port's forward + the float32 reference's (the same computation) + the float64 oracle's
(twice the bytes). An upper bound: the three forwards' transients never coexist."""

ENV = "SSM_EQUIV_MAX_MEMORY"


class MemoryLimitError(EquivError):
    """A run whose estimated memory exceeds what the machine has (or SSM_EQUIV_MAX_MEMORY allows)."""


def human(n: int) -> str:
    """Bytes for people: '1.5 GB', '320 MB'."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def _parse_size(text: str) -> int:
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", text.upper())
    if not found:
        raise MemoryLimitError(f"{ENV}: expected a size in bytes (e.g. 1500000000 or 1.5G), got "
                               f"{quote(text)}")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[found.group(2)]
    return int(float(found.group(1)) * scale)


def _meminfo_available() -> int | None:
    try:
        blob = read_bytes("/proc/meminfo", "the kernel's memory statistics", 1 << 16)
    except EquivError:
        return None
    found = re.search(rb"^MemAvailable:\s+(\d+) kB", blob, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None


def memory_limit() -> tuple[int, str]:
    """(bytes a run may use, where that figure comes from)."""
    available, source = _meminfo_available(), "MemAvailable in /proc/meminfo"
    if available is None:
        try:
            available, source = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "physical memory"
        except (ValueError, OSError, AttributeError):
            available, source = 2**63, "unknown memory"
    cap = os.environ.get(ENV)
    if cap:
        limit = _parse_size(cap)
        if limit < available:
            return limit, f"{ENV}={cap.strip()}"
    return available, source


def logits_bytes(vocab_size: int, batch: int, seq_len: int) -> int:
    """What the harness holds for any port: the logits of the port and the reference (float32) and
    of the oracle (float64), plus the token ids."""
    return batch * seq_len * (vocab_size * (4 + 4 + 8) + 8)


def model_estimate(model, name: str, batch: int, seq_len: int) -> int | None:
    """The model's own `memory_estimate(batch, seq_len)`, validated; None when it has none."""
    estimate = getattr(model, "memory_estimate", None)
    if estimate is None:
        return None
    try:
        got = estimate(batch, seq_len)
    except EquivError:
        raise
    except Exception as e:  # noqa: BLE001 - a port's own failure, named, not a traceback
        raise EquivError(f"port {quote(name)}: memory_estimate({batch}, {seq_len}) raised "
                         f"{type(e).__name__}: {clip(str(e), 60)}") from None
    if isinstance(got, bool) or not hasattr(got, "__index__") or int(got) < 0:
        raise EquivError(f"port {quote(name)}: memory_estimate({batch}, {seq_len}): expected an int >= 0 "
                         f"(bytes), got {clip(repr(got), 40)} ({type(got).__name__})")
    return int(got)


def _detail(model, batch: int, seq_len: int) -> str:
    """' (what dominates it)' from the model's optional memory_detail(batch, seq_len), else ''."""
    detail = getattr(model, "memory_detail", None)
    if detail is None:
        return ""
    try:
        text = detail(batch, seq_len)
    except Exception:  # noqa: BLE001 - an explanation only: its failure must not hide the refusal
        return ""
    return f" ({clip(text, 120)})" if isinstance(text, str) and text else ""


def require_memory(model, name: str, batch: int, seq_len: int, what: str) -> int:
    """Refuse, in one line naming the estimate and the limit, a (batch, seq_len) run the machine
    cannot hold. `what` names the sizes as the user gave them ('--batch 2 --seq-len 64').
    Returns the estimated bytes."""
    own = model_estimate(model, name, batch, seq_len)
    harness = logits_bytes(int(model.vocab_size), batch, seq_len)
    need = max(RUN_FACTOR * own if own is not None else 0, harness)
    limit, source = memory_limit()
    if need > limit:
        detail = _detail(model, batch, seq_len)
        how = (f"the port estimates {human(own)} for its largest forward{detail}, x{RUN_FACTOR} for the "
               "port, the reference and the float64 oracle"
               if own is not None and RUN_FACTOR * own >= harness else
               f"the logits of the port, the reference and the oracle ({batch} x {seq_len} tokens x "
               f"{int(model.vocab_size)} vocab) alone")
        raise MemoryLimitError(f"{what}: expected a run that fits in memory, it needs about {human(need)} "
                               f"({how}), more than the {human(limit)} available ({source}); use smaller "
                               "sizes")
    return need
