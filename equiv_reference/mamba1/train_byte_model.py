"""Train the small byte-level Mamba-1 fixture: transformers `MambaForCausalLM`, torch path with its
sequential selective scan, CPU, float32, on the Python standard library's own source.

    python -m equiv_reference.mamba1.train_byte_model --out fixtures/mamba1-trained-bytes   # the fixture
    python -m equiv_reference.mamba1.train_byte_model --probe 5       # time 5 steps, write nothing

Why trained: greedy decodes of a random-weight model are near-ties or collapse onto one token, so a
port correct to float32 rounding can still flip a token, or a wrong one can still match. A trained
model's margins are large and its continuations are text, so token-for-token greedy matching means
something.

Same corpus, tokenizer, held-out rule, optimizer and prompts as the Mamba-2 fixture (both take
them from equiv_reference/byte_training.py), so the two families' decode plans read alike.
Sized for a 6-minute budget on one thread.

Training swaps one function: transformers' sequential scan slices its (b, e, l, n) tensors once per
time step, and each slice's gradient is a full-size zero tensor, so its backward costs O(l^2) (45 s a
step at this size). `training_scan` is the same recurrence on per-step slices taken with `unbind`
(backward O(l)); tests/test_mamba1_reference.py checks it against the torch body. Everything after
training (held-out bits/byte, greedy decodes) runs transformers' own sequential scan, and every forward
runs inside `equiv_reference.mamba1.provenance.DispatchRecorder`, so training.json records which code ran.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from equiv_reference import byte_tokenizer as tok
from equiv_reference.byte_training import (
    N_NEW_TOKENS,
    PROMPTS,
    bits_per_byte,
    load_corpus,
    make_optimizer,
    param_count,
    random_windows,
    set_determinism,
    versions,
)
from equiv_reference.mamba1.provenance import (
    SCAN,
    STATE_UPDATE,
    DispatchRecorder,
    import_modeling,
    import_record,
)

GENERATOR = "equiv_reference.mamba1.train_byte_model"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Attributes as in equiv_reference/mamba2/train_byte_model.py's TrainConfig."""

    seed: int = 20261207
    steps: int = 280
    batch: int = 16
    seq_len: int = 128
    lr: float = 4e-3
    warmup: int = 20
    final_lr_frac: float = 0.1
    weight_decay: float = 0.1
    clip: float = 1.0
    threads: int = 1
    log_every: int = 25
    curve_heldout_windows: int = 16
    eval_windows: int = 64
    heldout_every: int = 10


# hidden 128 (e = 256), 4 layers, state 16, the "auto" rank 128 / 16 = 8, conv 4: 0.5 M parameters, ~1 s a
# step of 16 x 128 bytes on one thread.
MODEL_KW = dict(vocab_size=tok.VOCAB_SIZE, hidden_size=128, num_hidden_layers=4, state_size=16, expand=2,
                conv_kernel=4, time_step_rank=8, use_bias=False, use_conv_bias=True, tie_word_embeddings=True,
                residual_in_fp32=True, use_mambapy=False, bos_token_id=tok.BOS_ID, eos_token_id=tok.EOS_ID,
                pad_token_id=tok.PAD_ID)


def training_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                  return_last_state=False, **kwargs):
    """`mamba_selective_scan`'s sequential loop (same arguments, same recurrence and outputs) with the
    per-step slices taken by `unbind`, whose backward is one stack instead of l full-size scatters."""
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    b, e, _ = hidden_states.shape
    state = hidden_states.new_zeros(b, e, A.shape[-1])
    outputs = []
    for x_t, dt_t, B_t, C_t in zip(hidden_states.unbind(2), dt.unbind(2), B.unbind(2), C.unbind(2)):
        state = torch.exp(A * dt_t[..., None]) * state + (dt_t * x_t)[..., None] * B_t[:, None, :]
        outputs.append(torch.einsum("ben,bn->be", state, C_t))
    y = torch.stack(outputs, dim=-1)
    if D is not None:
        y = y + hidden_states * D[None, :, None]
    if z is not None:
        y = y * F.silu(z)
    return (y, state) if return_last_state else y


def build_model(seed: int):
    mm = import_modeling("mamba")
    torch.manual_seed(seed)
    return mm.MambaForCausalLM(mm.MambaConfig(**MODEL_KW)).float(), mm


def train(cfg: TrainConfig, train_ids, held_ids, probe_steps: int | None = None):
    model, mm = build_model(cfg.seed)
    opt, sched = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    curve_held = random_windows(held_ids, cfg.curve_heldout_windows, cfg.seq_len,
                                torch.Generator().manual_seed(cfg.seed + 3))
    curve, window_losses = [], []
    steps = probe_steps or cfg.steps
    t0 = time.perf_counter()
    recorder = DispatchRecorder(mm, substitutes={SCAN: training_scan})
    with recorder:
        for step in range(steps):
            w = random_windows(train_ids, cfg.batch, cfg.seq_len, gen)                     # (b, l+1)
            logits = model(input_ids=w[:, :-1]).logits                                      # (b, l, v)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            sched.step()
            window_losses.append(loss.item() / math.log(2))
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                point = {"step": step + 1, "train_bits_per_byte": round(statistics.fmean(window_losses), 4),
                         "heldout_bits_per_byte": round(bits_per_byte(model, curve_held, cfg.batch), 4),
                         "lr": sched.get_last_lr()[0], "wall_s": round(time.perf_counter() - t0, 1)}
                curve.append(point)
                window_losses = []
                print(json.dumps(point), flush=True)
    recorder.require_called(SCAN, what="training")
    return model, mm, recorder.record(), curve, time.perf_counter() - t0


def greedy_decode(model, mm, prompt: str, n_new: int = N_NEW_TOKENS):
    """transformers `generate`, greedy, on the recorded torch path. Returns (new ids, top-1 minus top-2
    logit per step)."""
    from transformers import GenerationConfig

    ids = torch.tensor([tok.encode(prompt)])
    gc = GenerationConfig(do_sample=False, max_new_tokens=n_new, eos_token_id=tok.EOS_ID,
                          pad_token_id=tok.PAD_ID, bos_token_id=tok.BOS_ID, return_dict_in_generate=True,
                          output_logits=True)
    model.eval()
    with torch.no_grad(), DispatchRecorder(mm) as recorder:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    recorder.require_sequential_scan(what=f"generate from {prompt!r}")
    recorder.require_called(STATE_UPDATE, what=f"generate from {prompt!r}")
    new = out.sequences[0, ids.shape[1]:].tolist()
    top2 = torch.stack(out.logits)[:, 0].topk(2, dim=-1).values                        # (steps, 2)
    return new, (top2[:, 0] - top2[:, 1]).tolist()


def decode_report(model, mm, prompts=PROMPTS):
    rows, margins = [], []
    for prompt in prompts:
        new, m = greedy_decode(model, mm, prompt)
        margins += m
        rows.append({"prompt": prompt, "continuation_ids": new, "continuation": tok.decode(new),
                     "margin_median": statistics.median(m), "margin_min": min(m)})
        print(f"--- {prompt!r} (margin median {statistics.median(m):.3f}, min {min(m):.4f})\n"
              f"{prompt}{tok.decode(new)}", flush=True)
    summary = {"n_new_tokens": N_NEW_TOKENS, "margin_median": statistics.median(margins),
               "margin_min": min(margins),
               "fraction_below_0.1": sum(m < 0.1 for m in margins) / len(margins)}
    return rows, summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="checkpoint directory to write")
    ap.add_argument("--probe", type=int, help="time this many steps, write nothing")
    for f in ("steps", "batch", "seq_len", "threads", "seed"):
        ap.add_argument("--" + f.replace("_", "-"), type=int)
    ap.add_argument("--lr", type=float)
    args = ap.parse_args(argv)
    if (args.out is None) == (args.probe is None):
        ap.error("give exactly one of --out and --probe")
    overrides = {f: getattr(args, f) for f in ("steps", "batch", "seq_len", "threads", "seed", "lr")
                 if getattr(args, f) is not None}
    cfg = TrainConfig(**overrides)
    set_determinism(cfg.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t_start = time.perf_counter()
    train_ids, held_ids, files = load_corpus(cfg.heldout_every)
    print(f"corpus: {len(files)} files, train {train_ids.numel():,} bytes, held-out {held_ids.numel():,}")
    model, mm, dispatch, curve, train_wall = train(cfg, train_ids, held_ids, args.probe)
    print(f"{param_count(model):,} parameters")
    if args.probe:
        print(f"probe: {args.probe} steps in {train_wall:.1f}s = {train_wall / args.probe:.2f} s/step "
              f"(batch {cfg.batch} x seq {cfg.seq_len})")
        return 0
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    held = random_windows(held_ids, cfg.eval_windows, cfg.seq_len, gen)
    train_eval = random_windows(train_ids, cfg.eval_windows, cfg.seq_len, gen)
    with DispatchRecorder(mm) as recorder:
        final = {"train_bits_per_byte": bits_per_byte(model, train_eval, cfg.batch),
                 "heldout_bits_per_byte": bits_per_byte(model, held, cfg.batch),
                 "eval_windows": cfg.eval_windows, "eval_seq_len": cfg.seq_len}
    recorder.require_sequential_scan(what="the final evaluation")
    evaluation_scan = recorder.record()["scan"]
    print(json.dumps(final))
    rows, summary = decode_report(model, mm)
    print(json.dumps(summary))

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    record = {
        "generator": GENERATOR,
        "what": "byte-level Mamba-1 (transformers MambaForCausalLM) trained on CPU on the Python "
                f"standard library's top-level *.py; written by `python -m {GENERATOR}`",
        "train_config": asdict(cfg), "model_config": MODEL_KW, "parameters": param_count(model),
        "tokenizer": {"module": "equiv_reference.byte_tokenizer", "vocab_size": tok.VOCAB_SIZE,
                      "ids_used": tok.N_IDS_USED, "bos": tok.BOS_ID, "eos": tok.EOS_ID, "pad": tok.PAD_ID,
                      "file_separator": "eos"},
        "eos_id": tok.EOS_ID, "pad_id": tok.PAD_ID,  # what the harness's decode plan reads
        "reference_path": {"import": import_record(mm), "training_dispatch": dispatch,
                           "evaluation_scan": evaluation_scan,
                           "decodes": "transformers' torch bodies, sequential scan and cached decode step "
                                      "(each decode checked by DispatchRecorder.require_*)"},
        "deterministic_algorithms": True, "threads": cfg.threads,
        "loss_curve": curve, "final": final, "prompts": list(PROMPTS), "decodes": rows, "margins": summary,
        "decodes_written_by": "training run",
        "data": {"stdlib": sysconfig.get_paths()["stdlib"], "glob": "*.py (top level, sorted by name)",
                 "heldout_rule": f"index % {cfg.heldout_every} == {cfg.heldout_every // 2}", "files": files},
        "versions": versions(), "train_wall_s": round(train_wall, 1),
        "total_wall_s": round(time.perf_counter() - t_start, 1),
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    sizes = ", ".join(f"{p.name} {p.stat().st_size:,} B" for p in sorted(args.out.iterdir()))
    print(f"wrote {args.out}: {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
