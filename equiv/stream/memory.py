"""Peak resident memory, recorded in every `equiv diff` report, and what an in-memory diff of a
checkpoint would need, which decides when `equiv diff` streams by itself."""

from __future__ import annotations

import resource
import sys

from equiv.memory import RUN_FACTOR, MemoryLimitError, human, logits_bytes, memory_limit, model_estimate

WEIGHT_COPIES = 4
"""An in-memory diff holds the weights three times at once, as float32 or wider: the port (float32),
the reference (float32) and the float64 oracle (twice the bytes): 4x the float32 bytes."""

STAGE_COPIES = 4
"""A streamed stage at its peak: the stage's tensors as read (kept for the next side, up to float32
bytes), the oracle's float64 copy (twice) and the copy of the side being built: 4x its float32 bytes."""


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (getrusage: kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def in_memory_need(weights_f32_bytes: int, side, name: str, batch: int, seq_len: int) -> int:
    """Bytes an in-memory diff needs: the weights WEIGHT_COPIES times, plus RUN_FACTOR times the port's
    own estimate of its largest forward when it has one (equiv/memory.py)."""
    own = model_estimate(side, name, batch, seq_len)
    return WEIGHT_COPIES * weights_f32_bytes + (RUN_FACTOR * own if own is not None else 0)


def streaming_reason(need: int, streamed: int) -> str | None:
    """Why to stream: the in-memory need beyond the memory limit while the streamed need is within it,
    in words; None otherwise (then the in-memory run goes ahead, or refuses with its own reason)."""
    limit, source = memory_limit()
    if need <= limit or streamed > limit:
        return None
    return (f"an in-memory diff needs about {human(need)} (the weights {WEIGHT_COPIES}x: port, reference "
            f"and float64 oracle, and the forwards), more than the {human(limit)} available ({source}): "
            "streaming layer by layer (--stream)")


def streamed_need(side, batch: int, seq_len: int) -> int:
    """Bytes a streamed diff needs at its peak: its largest stage's weights STAGE_COPIES times, RUN_FACTOR
    times one stage's activations, and the logits of the three sides (what the side declares:
    `largest_stage_f32_bytes()`, `stage_activation_bytes(batch, seq_len)`, both optional)."""
    weights = getattr(side, "largest_stage_f32_bytes", None)
    activations = getattr(side, "stage_activation_bytes", None)
    return (STAGE_COPIES * (weights() if weights else 0)
            + RUN_FACTOR * (activations(batch, seq_len) if activations else 0)
            + logits_bytes(int(side.vocab_size), batch, seq_len))


def require_streamed_memory(side, batch: int, seq_len: int) -> int:
    """Refuse, in one line, a streamed run the machine cannot hold either; returns its estimate."""
    need = streamed_need(side, batch, seq_len)
    limit, source = memory_limit()
    if need > limit:
        raise MemoryLimitError(f"--batch {batch} --seq-len {seq_len}: expected a streamed run that fits in "
                               f"memory, it needs about {human(need)} (its largest layer's weights "
                               f"{STAGE_COPIES}x, and one layer's activations), more than the {human(limit)} "
                               f"available ({source}); use smaller sizes")
    return need
