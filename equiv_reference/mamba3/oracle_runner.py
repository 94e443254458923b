"""The project's numpy Mamba-3 (equiv/mamba3/oracle.py) behind the reference-runner interface.

In float64 it is the oracle every Mamba-3 budget is measured against; in float32 it is a float32 run
of the same code (every operation rounded to float32, same order), an independent float32
computation. It needs neither torch nor mamba_ssm, so it runs anywhere. Its inputs are the
checkpoint's own tensors read by equiv.mamba3.convert.read_checkpoint (the reader the port uses),
kept in float64 and rounded by the oracle to the run dtype.

Decode continues the recurrence from the State of the previous span (oracle.forward's `states`),
one token at a time, exactly as the sequential form computes a full forward; so its step_logits
equal its full forward's logits up to nothing (the same operations in the same order).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from equiv.errors import EquivError
from equiv.inputs import check_tokens
from equiv.mamba3 import oracle
from equiv.mamba3.convert import read_checkpoint
from equiv.mamba3.taps import tap_names
from equiv.ports import GenerateResult

DTYPES = {"float64": np.float64, "float32": np.float32}


class OracleRunnerError(EquivError):
    """The oracle runner cannot run as asked (dtype, arguments)."""


class Mamba3OracleRunner:
    """`run`, `step_logits`, `generate`, `provenance` of equiv/mamba3/oracle.py in one dtype."""

    name = "oracle"

    def __init__(self, checkpoint_dir: str | Path, dtype: str = "float64"):
        if dtype not in DTYPES:
            raise OracleRunnerError(f"dtype: expected one of {sorted(DTYPES)} for the numpy oracle, "
                                    f"got {dtype!r}")
        self.checkpoint, self.dtype, self.np_dtype = str(checkpoint_dir), dtype, DTYPES[dtype]
        self.cfg, self.params, self.format = read_checkpoint(checkpoint_dir, np.float64)
        self.n_layers = self.cfg.n_layers
        self.tap_names = tap_names(self.n_layers)
        self.pad_id = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0

    def _forward(self, ids, mask=None, states=None):
        return oracle.forward(self.cfg, self.params, ids, mask, states, dtype=self.np_dtype)

    def run(self, ids, mask=None) -> dict[str, np.ndarray]:
        """Full forward; every canonical tap, in the run dtype. Left padding: padded positions are
        zeroed at in_proj's input (oracle.mixer), so they add nothing."""
        ids, mask = check_tokens(ids, self.cfg.vocab_size, mask)
        taps, _ = self._forward(ids, mask)
        return {k: np.asarray(taps[k], self.np_dtype) for k in self.tap_names}

    def step_logits(self, ids, mask, prompt_len: int) -> np.ndarray:
        """Prefill ids[:, :prompt_len], then one token at a time from the carried State. Returns
        (b, l - prompt_len + 1, v)."""
        ids, mask = check_tokens(ids, self.cfg.vocab_size, mask)
        l = ids.shape[1]
        if isinstance(prompt_len, bool) or not isinstance(prompt_len, int | np.integer) \
                or not 1 <= prompt_len <= l:
            raise OracleRunnerError(f"prompt_len: expected an int in [1, l={l}], got {prompt_len!r}")
        taps, states = self._forward(ids[:, :prompt_len], None if mask is None else mask[:, :prompt_len])
        steps = [taps["logits"][:, -1]]
        for t in range(prompt_len, l):
            taps, states = self._forward(ids[:, t:t + 1], None, states)
            steps.append(taps["logits"][:, -1])
        return np.stack(steps, axis=1)

    def generate(self, prompt, mask=None, max_new_tokens: int = 32,
                 eos_id: int | None = None) -> GenerateResult:
        """Greedy (ties to the lowest id, as torch.argmax), margins top-1 minus top-2; after a row's eos
        it emits pad with NaN margins; stops when every row has emitted eos."""
        prompt, mask = check_tokens(prompt, self.cfg.vocab_size, mask)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise OracleRunnerError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        if eos_id is not None and not 0 <= eos_id < self.cfg.vocab_size:
            raise OracleRunnerError(f"eos_id: expected None or an id in [0, {self.cfg.vocab_size}), "
                                    f"got {eos_id}")
        taps, states = self._forward(prompt, mask)
        logits = taps["logits"][:, -1]
        done = np.zeros(prompt.shape[0], bool)
        tokens, margins = [], []
        for step in range(max_new_tokens):
            top2 = np.sort(logits.astype(np.float64), axis=-1)[:, -2:]
            nxt = np.where(done, self.pad_id, np.argmax(logits, axis=-1)).astype(np.int32)
            tokens.append(nxt)
            margins.append(np.where(done, np.nan, top2[:, 1] - top2[:, 0]).astype(np.float32))
            if eos_id is not None:
                done = done | (nxt == eos_id)
                if done.all():
                    break
            if step + 1 < max_new_tokens:
                taps, states = self._forward(nxt[:, None], None, states)
                logits = taps["logits"][:, -1]
        return GenerateResult(np.stack(tokens, axis=1), np.stack(margins, axis=1), len(tokens))

    def provenance(self) -> dict:
        import platform

        return {
            "reference": "equiv/mamba3/oracle.py (the project's numpy Mamba-3, sequential recurrence)",
            "role": "float64 oracle" if self.dtype == "float64" else "float32 run of the oracle's code",
            "checkpoint": Path(self.checkpoint).name,
            "checkpoint_format": self.format,
            "dtype": self.dtype,
            "versions": {"python": platform.python_version(), "numpy": np.__version__},
            "attention_mask": "left padding: padded positions zeroed at in_proj's input",
        }
