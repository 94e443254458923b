"""Token-for-token greedy decode matching, model-agnostic.

For a batch of prompts: the port's on-device `generate` against the reference's own generate
(transformers `generate(do_sample=False)`), then teacher-forced logits along the reference's
trajectory compared by the error budget against the float64 oracle's *full* forward (no cache: the
reference's cache path can be wrong too, docs/porting-bugs.md #4 and #5, so it is checked separately
against its own full forward).

On the first token mismatch the step is classified:
- near-tie: the reference's top-1/top-2 margin is within what float rounding can flip: twice the
  sum of the reference's measured logit error against the oracle at that step and the port's,
  the port's counted only up to what a correct port may have (the budget times the reference's
  error, floored at a few ULPs): a port far off cannot widen the bound that would excuse it. Never
  when the port's teacher-forced logits fail the budget. Reported, does not fail.
- reference-defect: the float64 oracle's full forward picks the port's token, and the reference's
  cached decode disagrees with its own full forward. Reported loudly, does not fail the port.
- divergence: anything else. Fails.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from equiv.compare import FLOOR_ULPS, TapComparison, compare_tap, tolerance, ulp_at
from equiv.errors import EquivError


@dataclass
class Mismatch:
    row: int
    step: int
    port_token: int
    reference_token: int
    oracle_token: int
    port_margin: float
    reference_margin: float
    logit_error_bound: float
    classification: str  # near-tie | reference-defect | divergence


@dataclass
class DecodeResult:
    """One batch of prompts decoded greedily by both sides."""

    prompt_lengths: list[int]
    max_new_tokens: int
    port_tokens: list[list[int]]
    reference_tokens: list[list[int]]
    matched_steps: list[int]  # per row: steps equal before the first mismatch (or all)
    total_steps: list[int]
    mismatches: list[Mismatch] = field(default_factory=list)
    logits: TapComparison | None = None  # teacher-forced port decode vs oracle full forward
    reference_consistency: TapComparison | None = None  # reference cached decode vs oracle full forward
    median_reference_margin: float = math.nan
    # informational, beside the budget (the logit checker metrics of other JAX ports): over the
    # compared steps, KL(reference || port) of the softmaxes in float64, and how often the top-1 /
    # top-5 token sets of the port's teacher-forced logits equal the reference's full forward's
    kl_mean: float = math.nan
    kl_max: float = math.nan
    top1_agreement: float = math.nan
    top5_agreement: float = math.nan
    verdict: str = "pass"
    reason: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["logits"] = self.logits.to_dict() if self.logits else None
        consistency, margin = self.reference_consistency, self.median_reference_margin
        d["reference_consistency"] = consistency.to_dict() if consistency else None
        d["median_reference_margin"] = None if math.isnan(margin) else margin
        for key in ("kl_mean", "kl_max", "top1_agreement", "top5_agreement"):
            d[key] = None if math.isnan(d[key]) else d[key]
        return d


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _top5(logits: np.ndarray) -> np.ndarray:
    """The (at most) 5 largest logits' token ids of each row, as a sorted set."""
    return np.sort(np.argsort(-logits, axis=-1, kind="stable")[:, :5], axis=-1)


def logit_agreement(port: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Per-token KL(reference || port) of the softmaxes (float64) and top-1 / top-5 set agreement,
    over rows of (n, v) logits; {} for no rows."""
    if len(port) == 0:
        return {}
    p64, r64 = np.asarray(port, np.float64), np.asarray(reference, np.float64)
    log_p, log_r = _log_softmax(p64), _log_softmax(r64)
    kl = np.maximum((np.exp(log_r) * (log_r - log_p)).sum(-1), 0.0)  # >= 0 up to rounding
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float((p64.argmax(-1) == r64.argmax(-1)).mean()),
            "top5_agreement": float((_top5(p64) == _top5(r64)).all(-1).mean())}


def _until_eos(tokens: np.ndarray, eos_id: int | None) -> list[int]:
    out = []
    for t in tokens.tolist():
        out.append(int(t))
        if eos_id is not None and t == eos_id:
            break
    return out


def _margin(logits: np.ndarray) -> float:
    top = np.sort(logits)[-2:]
    return float(top[1] - top[0])


def full_logits(runner, ids, mask) -> np.ndarray:
    """A runner's full-forward logits: its `logits` method when it has one (recordings keep only
    what is needed), else the 'logits' tap of `run`."""
    method = getattr(runner, "logits", None)
    return method(ids, mask) if method else runner.run(ids, mask)["logits"]


def match_greedy(model, reference, oracle, prompts: np.ndarray, mask: np.ndarray | None,
                 max_new_tokens: int, eos_id: int | None = None, dtype: str = "float32") -> DecodeResult:
    """prompts (b, P) left-padded where `mask` is given. `reference` and `oracle` are runners with
    `generate`, `run` and `step_logits` (oracle in float64)."""
    b, P = prompts.shape
    lengths = [int(mask[i].sum()) if mask is not None else P for i in range(b)]
    port_gen = model.generate(prompts, mask, max_new_tokens, eos_id)
    ref_gen = reference.generate(prompts, mask, max_new_tokens, eos_id)
    port_tok = [_until_eos(port_gen.tokens[i], eos_id) for i in range(b)]
    ref_tok = [_until_eos(ref_gen.tokens[i], eos_id) for i in range(b)]

    # teacher forcing along the reference's trajectory (padded with its own pad to a rectangle)
    T = ref_gen.tokens.shape[1]
    seq = np.concatenate([prompts, np.asarray(ref_gen.tokens, np.int32)], axis=1)
    full_mask = None if mask is None else np.concatenate([mask, np.ones((b, T), mask.dtype)], axis=1)
    port_steps = model.step_logits(seq, full_mask, P)[:, :T]  # b T v: prediction for step k
    ref_steps = reference.step_logits(seq, full_mask, P)[:, :T]
    ref_full = full_logits(reference, seq, full_mask)[:, P - 1:P - 1 + T]
    oracle_full = full_logits(oracle, seq, full_mask)[:, P - 1:P - 1 + T]
    valid = [len(r) for r in ref_tok]  # compare only steps the reference really generated
    sel = lambda a: np.concatenate([a[i, :valid[i]] for i in range(b)])  # noqa: E731
    precision = getattr(reference, "judged_precision", None)  # as in run_layerwise
    logits_cmp = compare_tap("decode.logits", sel(port_steps), sel(ref_full), sel(oracle_full), dtype,
                             reference_precision=precision)
    ref_cmp = compare_tap("reference.cached_decode", sel(ref_steps), sel(ref_full), sel(oracle_full), dtype,
                          reference_precision=precision)

    result = DecodeResult(prompt_lengths=lengths, max_new_tokens=max_new_tokens, port_tokens=port_tok,
                          reference_tokens=ref_tok, matched_steps=[], total_steps=valid,
                          logits=logits_cmp, reference_consistency=ref_cmp,
                          **logit_agreement(sel(port_steps), sel(ref_full)))
    margins = []
    for i in range(b):
        n = min(len(port_tok[i]), len(ref_tok[i]))
        k = next((s for s in range(n) if port_tok[i][s] != ref_tok[i][s]), None)
        if k is None and len(port_tok[i]) != len(ref_tok[i]):
            k = n  # one side stopped (EOS) earlier
        margins += [_margin(ref_steps[i, s]) for s in range(valid[i])]
        result.matched_steps.append(valid[i] if k is None else k)
        if k is None or k >= T:
            continue
        p_token = port_tok[i][k] if k < len(port_tok[i]) else -1
        r_token = ref_tok[i][k] if k < len(ref_tok[i]) else -1
        result.mismatches.append(_classify(i, k, p_token, r_token, port_steps, ref_steps, ref_full,
                                           oracle_full, logits_cmp, ref_cmp, dtype))
    result.median_reference_margin = float(np.median(margins)) if margins else math.nan
    return _conclude(result, logits_cmp, ref_cmp, valid)


def _classify(i: int, k: int, p_token: int, r_token: int, port_steps, ref_steps, ref_full, oracle_full,
              logits_cmp: TapComparison, ref_cmp: TapComparison, dtype: str) -> Mismatch:
    """Row i's token mismatch at step k: near-tie, reference-defect or divergence (module docstring)."""
    # a broken reference cache must not inflate the rounding bound: then use its full forward
    ref_k = ref_steps[i, k] if ref_cmp.verdict == "pass" else ref_full[i, k]
    err_r = float(np.abs(ref_k - oracle_full[i, k]).max())
    allowed = tolerance(dtype).budget * max(err_r, FLOOR_ULPS * ulp_at(
        float(np.abs(oracle_full[i, k]).max()), dtype))  # what a correct port may err by here
    err_p = min(float(np.abs(port_steps[i, k] - oracle_full[i, k]).max()), allowed)
    bound = tolerance(dtype, "near_tie_factor").budget * (err_p + err_r)
    ref_margin = _margin(ref_k)
    o_token = int(np.argmax(oracle_full[i, k]))
    if o_token == p_token != r_token and ref_cmp.verdict == "fail":
        cls = "reference-defect"
    elif ref_margin <= bound and logits_cmp.verdict == "pass":
        cls = "near-tie"
    else:
        cls = "divergence"
    return Mismatch(row=i, step=k, port_token=p_token, reference_token=r_token, oracle_token=o_token,
                    port_margin=_margin(port_steps[i, k]), reference_margin=ref_margin,
                    logit_error_bound=bound, classification=cls)


def _conclude(result: DecodeResult, logits_cmp: TapComparison, ref_cmp: TapComparison,
              valid: list[int]) -> DecodeResult:
    """The verdict and its one-line reason."""
    fails = [mm for mm in result.mismatches if mm.classification == "divergence"]
    if logits_cmp.verdict != "pass":
        result.verdict, result.reason = "fail", f"teacher-forced decode logits: {logits_cmp.reason}"
    elif fails:
        f = fails[0]
        result.verdict = "fail"
        result.reason = (f"row {f.row} step {f.step}: port {f.port_token} vs reference {f.reference_token} "
                         f"(reference margin {f.reference_margin:.3g} > rounding bound "
                         f"{f.logit_error_bound:.3g})")
    else:
        result.reason = (f"{sum(result.matched_steps)}/{sum(valid)} steps matched; KL(ref||port) mean "
                         f"{result.kl_mean:.2g}, top-5 agreement {result.top5_agreement:.0%}"
                         + (f"; {len(result.mismatches)} mismatch(es) explained "
                            f"({', '.join(sorted({m.classification for m in result.mismatches}))})"
                            if result.mismatches else ""))
    if ref_cmp.verdict == "fail":
        result.reason += f"; REFERENCE cached decode disagrees with its own full forward ({ref_cmp.reason})"
    return result


def match_teacher_forced(port_steps: np.ndarray, ref_steps: np.ndarray, ref_full: np.ndarray,
                         oracle_full: np.ndarray, prompt_lengths: list[int],
                         dtype: str = "float32") -> DecodeResult:
    """The decode match without free-running generation: every side is fed the same sequence.

    (b, T, v) logits predicting the T tokens after a prompt of P columns: the port's cached decode
    (`step_logits`), the reference's cached decode, and the reference's and the oracle's full
    forwards at the same positions. Each side's token at a step is its greedy choice there (the
    argmax), so every step is compared on the same prefix: a mismatch does not end the comparison,
    `matched_steps` counts the steps whose choices agree and every mismatch is classified. Used where
    generation cannot run, e.g. a model streamed layer by layer (equiv/stream), where each step
    would need every layer again."""
    b, T = port_steps.shape[:2]
    flat = lambda a: a.reshape(b * T, -1)  # noqa: E731
    ref_full_f, oracle_full_f = flat(ref_full), flat(oracle_full)
    logits_cmp = compare_tap("decode.logits", flat(port_steps), ref_full_f, oracle_full_f, dtype)
    ref_cmp = compare_tap("reference.cached_decode", flat(ref_steps), ref_full_f, oracle_full_f, dtype)
    port_tok = np.argmax(port_steps, axis=-1).astype(int).tolist()
    ref_tok = np.argmax(ref_steps, axis=-1).astype(int).tolist()
    result = DecodeResult(prompt_lengths=list(prompt_lengths), max_new_tokens=T, port_tokens=port_tok,
                          reference_tokens=ref_tok, matched_steps=[], total_steps=[T] * b,
                          logits=logits_cmp, reference_consistency=ref_cmp,
                          **logit_agreement(flat(port_steps), ref_full_f))
    for i in range(b):
        result.matched_steps.append(sum(p == r for p, r in zip(port_tok[i], ref_tok[i], strict=True)))
        result.mismatches += [_classify(i, k, port_tok[i][k], ref_tok[i][k], port_steps, ref_steps, ref_full,
                                        oracle_full, logits_cmp, ref_cmp, dtype)
                              for k in range(T) if port_tok[i][k] != ref_tok[i][k]]
    margins = [_margin(ref_steps[i, k]) for i in range(b) for k in range(T)]
    result.median_reference_margin = float(np.median(margins)) if margins else math.nan
    return _conclude(result, logits_cmp, ref_cmp, [T] * b)


def teacher_forced_decode(model, reference, oracle, ids: np.ndarray, mask: np.ndarray | None, prompt_len: int,
                          dtype: str = "float32") -> DecodeResult:
    """`match_teacher_forced` on models held in memory: prefill ids[:, :prompt_len], then one cached
    decode step per further token, against the full forwards of the reference and the oracle."""
    T = ids.shape[1] - prompt_len
    if not 1 <= T < ids.shape[1]:
        raise EquivError(f"prompt_len: expected 1 <= prompt_len < l={ids.shape[1]}, got {prompt_len}")
    window = slice(prompt_len - 1, prompt_len - 1 + T)
    return match_teacher_forced(model.step_logits(ids, mask, prompt_len)[:, :T],
                                reference.step_logits(ids, mask, prompt_len)[:, :T],
                                full_logits(reference, ids, mask)[:, window],
                                full_logits(oracle, ids, mask)[:, window],
                                real_prompt_lengths(mask, prompt_len, len(ids)), dtype)


def real_prompt_lengths(mask: np.ndarray | None, prompt_len: int, batch: int) -> list[int]:
    """The real (unpadded) tokens of each row's prompt."""
    if mask is None:
        return [prompt_len] * batch
    return [int(np.asarray(mask)[i, :prompt_len].sum()) for i in range(batch)]
