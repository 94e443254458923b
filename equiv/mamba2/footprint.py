"""How many bytes one Mamba-2 forward holds at its peak, from the config alone: the built-in port's
`memory_estimate` (port protocol, equiv/ports.py), which the harness checks against the machine's
memory before it runs anything (equiv/memory.py).

Counted in float32 (the oracle's float64 doubles it; the harness multiplies):

* every tap, held until compared: b x l x (its width), twice (on the device and as the numpy copy);
* the SSD of one layer (transient), in the form that costs most, the reference's: transformers'
  torch path pads the sequence to whole chunks of chunk_size and builds per chunk the (b, h, c, q, q)
  decay and score matrices (segment_sum's masked copies, L, G, M: up to 5 alive), the (b, c, h, p,
  n) chunk states (3 copies) and the (b, h, c+1, c+1) chunk-to-chunk decay (4 copies), and holds
  the padded x, B, C and the partial outputs, (b, c*q, h, max(p, n)) each (6). So a chunk_size of
  30000 costs 30000^2 per head even for a 64-token input: the port does not pad this way, the
  reference does, and both run.
"""

from __future__ import annotations

import math

from equiv.mamba2.config import Mamba2Config

F32 = 4


def tap_widths(cfg: Mamba2Config) -> int:
    """The sum of every tap's last dimension (equiv/mamba2/taps.py), logits included."""
    per_layer = 4 * cfg.d_model + cfg.in_proj_dim + cfg.conv_dim + 2 * cfg.d_inner
    return 2 * cfg.d_model + cfg.n_layers * per_layer + cfg.vocab_size


def ssd_bytes(cfg: Mamba2Config, batch: int, seq_len: int) -> int:
    """The chunked SSD's transient peak for one layer, in the reference's padded form."""
    b, h, p, n, q = batch, cfg.n_heads, cfg.head_dim, cfg.d_state, cfg.chunk_size
    c = math.ceil(seq_len / q)
    quadratic = 5 * b * h * c * q * q
    states = 3 * b * (c + 1) * h * p * n + 4 * b * h * (c + 1) ** 2
    padded = 6 * b * c * q * h * max(p, n)
    return F32 * (quadratic + states + padded)


def forward_bytes(cfg: Mamba2Config, batch: int, seq_len: int) -> int:
    """Bytes of the largest forward of (batch, seq_len) tokens: taps + one layer's SSD."""
    return 2 * F32 * batch * seq_len * tap_widths(cfg) + ssd_bytes(cfg, batch, seq_len)


def dominant_term(cfg: Mamba2Config, batch: int, seq_len: int) -> str:
    """What makes the estimate large, for a refusal's message."""
    taps = 2 * F32 * batch * seq_len * tap_widths(cfg)
    q = cfg.chunk_size
    c = math.ceil(seq_len / q)
    if taps >= ssd_bytes(cfg, batch, seq_len):
        return f"taps: {tap_widths(cfg)} floats per token, {batch} x {seq_len} tokens"
    if 5 * batch * cfg.n_heads * c * q * q >= 4 * batch * cfg.n_heads * (c + 1) ** 2:
        return (f"chunk_size {q}: the chunked SSD pads to whole chunks and holds (b, h, c, q, q) = "
                f"({batch}, {cfg.n_heads}, {c}, {q}, {q}) decay and score matrices per layer")
    return (f"{c} chunks of chunk_size {q}: the chunked SSD holds a (b, h, c+1, c+1) = ({batch}, "
            f"{cfg.n_heads}, {c + 1}, {c + 1}) chunk-to-chunk decay per layer")
