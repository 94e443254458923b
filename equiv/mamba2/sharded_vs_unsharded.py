"""`equiv diff --mesh`: the built-in Mamba-2 port sharded over a device mesh (equiv/mamba2/sharding.py)
against the reference, and against the unsharded port with the same float64 oracle (a different
reduction order is a different float32 computation, so it is judged by the error budget, never by
bit equality), and greedy decode against the unsharded port's tokens. The family's `sharding`
module (Family.sharding): `shard` places a loaded model, `diff_against_unsharded` verifies it.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from equiv.errors import EquivError
from equiv.mamba2.port import Mamba2Model
from equiv.mamba2.sharding import ShardedMamba2Model, shard  # noqa: F401 - shard: the family's entry point

ISOLATED_AGAINST_UNSHARDED = (
    "isolated mode against the unsharded port: both ports compute each tap from the oracle's inputs to "
    "it (cast to the compared dtype), so the budget's denominator is the unsharded port's error on the "
    "same op: the ratio measures what placing the op on the mesh (its reduction order) costs")


class Remembered:
    """A runner whose run() is kept per input, so the float64 oracle runs once for every comparison
    that needs it on the same ids."""

    def __init__(self, runner):
        self.runner, self._runs = runner, {}

    def run(self, ids, mask=None):
        ids = np.asarray(ids)
        key = (ids.tobytes(), ids.shape, None if mask is None else np.asarray(mask).tobytes())
        if key not in self._runs:
            self._runs[key] = self.runner.run(ids, mask)
        return self._runs[key]

    def __getattr__(self, name):
        return getattr(self.runner, name)


class UnshardedPort:
    """The unsharded built-in port as a reference runner (run, logits, step_logits, generate,
    provenance). In isolated mode its run() is its own isolated forward on the oracle's inputs
    (ISOLATED_AGAINST_UNSHARDED)."""

    def __init__(self, model: Mamba2Model, oracle=None, mode: str = "accumulated", dtype: str = "float32"):
        self.model, self.oracle, self.mode, self.dtype = model, oracle, mode, dtype

    def run(self, ids, mask=None):
        if self.mode == "accumulated":
            return self.model.forward(ids, mask, taps=True)
        from equiv.layerwise import _in_compute_dtype  # what the harness feeds the port under test

        fed = {k: _in_compute_dtype(v, self.dtype) for k, v in self.oracle.run(ids, mask).items()}
        return self.model.forward_isolated(ids, mask, fed)

    def logits(self, ids, mask=None):
        return self.model.forward(ids, mask, taps=False)["logits"]

    def step_logits(self, ids, mask, prompt_len):
        return self.model.step_logits(ids, mask, prompt_len)

    def generate(self, prompt, mask=None, max_new_tokens=32, eos_id=None):
        return self.model.generate(prompt, mask, max_new_tokens, eos_id)

    def provenance(self) -> dict:
        return {"runner": "the unsharded built-in port", "port": asdict(self.model.info()),
                "code_path": f"equiv.mamba2 on one device, {self.mode}"}


def against_unsharded(sharded: ShardedMamba2Model, unsharded: Mamba2Model, oracle, ids, *, mode: str,
                      dtype: str, budget=None, seed=None, progress=None):
    """run_layerwise of the sharded port with the unsharded port as the reference and the same
    oracle (the reference's float64 run)."""
    from equiv.layerwise import ISOLATED_APPROXIMATION, run_layerwise

    reference = UnshardedPort(unsharded, oracle, mode, dtype)
    result = run_layerwise(sharded, reference, oracle, ids, None, mode=mode, dtype=dtype, budget=budget,
                           progress=progress, seed=seed)
    result.notes = [ISOLATED_AGAINST_UNSHARDED if n == ISOLATED_APPROXIMATION else n for n in result.notes]
    return result


def decode_against_unsharded(sharded, unsharded, oracle, checkpoint, dtype: str, seed: int = 0,
                             progress=None):
    """Greedy decode of the main job's plan (equiv.check.plan_for) by the sharded port against the
    unsharded port's tokens; a mismatch is classified by the harness's rule against the oracle."""
    from equiv.check import plan_for
    from equiv.decode import match_greedy
    from equiv.memory import require_memory

    plan = plan_for(Path(checkpoint), int(sharded.vocab_size), sharded.decode_lengths, seed)
    results = []
    for i, (prompts, mask) in enumerate(plan.decode_batches):
        require_memory(sharded, "builtin", prompts.shape[0], prompts.shape[1] + plan.max_new_tokens,
                       f"the decode plan's batch {i + 1}")
        if progress:
            progress(f"greedy decode {i + 1}/{len(plan.decode_batches)} on the mesh: {prompts.shape[0]} "
                     f"prompt(s) x {plan.max_new_tokens} tokens, against the unsharded port")
        results.append(match_greedy(sharded, UnshardedPort(unsharded), oracle, prompts, mask,
                                    plan.max_new_tokens, plan.eos_id, dtype))
    return results


def diff_against_unsharded(sharded, unsharded, oracle, ids, args, progress) -> bool:
    """`equiv diff --mesh`'s second half: prints (and with --out writes, under vs-unsharded/) the
    layer-wise comparison with the unsharded port and the decode match; True when both pass."""
    import json
    import sys

    from equiv.report import prepare_out_dir, terminal_table, write_reports

    oracle = Remembered(oracle)
    result = against_unsharded(sharded, unsharded, oracle, ids, mode=args.mode, dtype=args.dtype,
                               budget=args.budget, seed=args.seed, progress=progress.stage)
    if result.verdict == "inconclusive":
        raise EquivError("--mesh: no tap of the sharded port could be compared with the unsharded port")
    decodes = decode_against_unsharded(sharded, unsharded, oracle, args.checkpoint, args.dtype, args.seed,
                                       progress.stage)
    progress.close()
    lay = sharded.layout
    shape = f"{lay.data}x{lay.model}"
    sys.stdout.write(f"\n--mesh {shape} (data x model): the sharded port against the unsharded port, same "
                     "float64 oracle\n" + terminal_table(result))
    for i, d in enumerate(decodes):
        sys.stdout.write(f"greedy decode {i + 1}/{len(decodes)}, sharded vs unsharded port: "
                         f"{d.verdict.upper()}: {d.reason}\n")
    ok = result.verdict == "equivalent" and all(d.verdict == "pass" for d in decodes)
    sys.stdout.write(f"--mesh {shape}: against the unsharded port {result.verdict.upper()}, greedy decode "
                     f"{'PASS' if all(d.verdict == 'pass' for d in decodes) else 'FAIL'}\n")
    sys.stdout.flush()
    if args.out is not None:
        out = prepare_out_dir(Path(args.out) / "vs-unsharded")
        progress.stage(f"writing reports to {out}")
        write_reports(result, out)
        (out / "decode.json").write_text(json.dumps([d.to_dict() for d in decodes], indent=1, default=float))
        progress.close()
    return ok
