"""Train the small byte-level Mamba-2 fixture: transformers `Mamba2ForCausalLM`, torch fallback path,
CPU, float32, on the Python standard library's own source (text every Python install ships).

    python -m equiv_reference.mamba2.train_byte_model --out fixtures/trained-bytes         # the fixture
    python -m equiv_reference.mamba2.train_byte_model --probe 5 --batch 16 --seq-len 256
        # time 5 steps, write nothing
    python -m equiv_reference.mamba2.train_byte_model --redecode fixtures/trained-bytes
        # redo decodes + margins only

Why trained: greedy decodes of a random-weight model are dominated by near-ties (top-1/top-2 logit
margins ~1e-3), so a port that is correct to float32 rounding can still flip a token. A trained model's
margins are orders of magnitude larger, so token-for-token greedy matching means something.

Reproducible by construction: fixed seeds, torch.use_deterministic_algorithms, a fixed thread count and
a fixed, sorted file list whose sha256s are recorded (a different Python version shows up there).
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
from equiv_reference.mamba2 import dispatch


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Attributes:
    seed: one seed for init, batch sampling and held-out windows. steps: optimizer steps.
    batch: windows per step (b). seq_len: tokens per window (l). lr: peak AdamW learning rate.
    warmup: linear-warmup steps, then cosine to `lr * final_lr_frac`. weight_decay: on matrices only.
    clip: global grad-norm clip. threads: torch intra-op threads (results depend on it).
    log_every: steps per loss-curve point. curve_heldout_windows: held-out windows scored at each
    curve point. eval_windows: held-out (and train) windows for the final bits/byte.
    heldout_every: every k-th file of the sorted list is held out.
    """

    seed: int = 20261123
    steps: int = 260
    batch: int = 16
    seq_len: int = 256
    lr: float = 4e-3
    warmup: int = 20
    final_lr_frac: float = 0.1
    weight_decay: float = 0.1
    clip: float = 1.0
    threads: int = 1
    log_every: int = 20
    curve_heldout_windows: int = 16
    eval_windows: int = 64
    heldout_every: int = 10


# hidden 256, 4 layers, 16 heads of 32, state 32 (64 costs 25% more per step on this CPU), 2 groups
# (g > 1 so the group-wise bugs of docs/porting-bugs.md #1, #2 show up on this fixture too), chunk 64 <
# seq_len so the inter-chunk recurrence is exercised. 1.8 M parameters, 7.2 MB of float32.
MODEL_KW = dict(vocab_size=tok.VOCAB_SIZE, hidden_size=256, num_hidden_layers=4, state_size=32, head_dim=32,
                num_heads=16, expand=2, n_groups=2, conv_kernel=4, chunk_size=64, use_bias=False,
                use_conv_bias=True, tie_word_embeddings=True, residual_in_fp32=True,
                bos_token_id=tok.BOS_ID, eos_token_id=tok.EOS_ID, pad_token_id=tok.PAD_ID)


def import_mamba2_fallback():
    """transformers' Mamba-2, imported through `equiv_reference.provenance` (kernel packages hidden on first
    import). Returns (Mamba2Config, Mamba2ForCausalLM, modeling_mamba2 module). Every forward of this
    module then runs inside `dispatch.DispatchRecorder`, which calls the torch bodies and counts the calls,
    so the training record says what ran, not what was hoped."""
    mm = dispatch.import_modeling_mamba2()
    return mm.Mamba2Config, mm.Mamba2ForCausalLM, mm


# ---- data -----------------------------------------------------------------------------------------

# ---- training -------------------------------------------------------------------------------------

def build_model(seed: int):
    Mamba2Config, Mamba2ForCausalLM, mm = import_mamba2_fallback()
    torch.manual_seed(seed)
    return Mamba2ForCausalLM(Mamba2Config(**MODEL_KW)).float(), mm


def train(cfg: TrainConfig, train_ids, held_ids, probe_steps: int | None = None):
    model, mm = build_model(cfg.seed)
    opt, sched = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    curve_held = random_windows(held_ids, cfg.curve_heldout_windows, cfg.seq_len,
                                torch.Generator().manual_seed(cfg.seed + 3))
    curve, window_losses = [], []
    steps = probe_steps or cfg.steps
    t0 = time.perf_counter()
    with dispatch.DispatchRecorder(mm) as recorder:
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
    return model, recorder.record(), curve, time.perf_counter() - t0


# ---- greedy decodes and their margins -------------------------------------------------------------

def greedy_decode(model, prompt: str, n_new: int = N_NEW_TOKENS):
    """transformers `generate`, greedy. Returns (new token ids, top-1 minus top-2 logit per step)."""
    from transformers import GenerationConfig

    ids = torch.tensor([tok.encode(prompt)])
    gc = GenerationConfig(do_sample=False, max_new_tokens=n_new, eos_token_id=tok.EOS_ID,
                          pad_token_id=tok.PAD_ID, bos_token_id=tok.BOS_ID, return_dict_in_generate=True,
                          output_logits=True)
    model.eval()
    with torch.no_grad(), dispatch.DispatchRecorder(dispatch.import_modeling_mamba2()) as recorder:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    if recorder.calls["mamba2_selective_state_update"] == 0:  # the cached single-step path never ran
        raise RuntimeError(f"generate from {prompt!r} did not take the cached decode step")
    new = out.sequences[0, ids.shape[1]:].tolist()
    top2 = torch.stack(out.logits)[:, 0].topk(2, dim=-1).values                        # (steps, 2)
    return new, (top2[:, 0] - top2[:, 1]).tolist()


def decode_report(model, prompts=PROMPTS):
    rows, margins = [], []
    for prompt in prompts:
        new, m = greedy_decode(model, prompt)
        margins += m
        rows.append({"prompt": prompt, "continuation_ids": new, "continuation": tok.decode(new),
                     "margin_median": statistics.median(m), "margin_min": min(m)})
        print(f"--- {prompt!r} (margin median {statistics.median(m):.3f}, min {min(m):.4f})\n"
              f"{prompt}{tok.decode(new)}", flush=True)
    summary = {"n_new_tokens": N_NEW_TOKENS, "margin_median": statistics.median(margins),
               "margin_min": min(margins),
               "fraction_below_0.1": sum(m < 0.1 for m in margins) / len(margins)}
    return rows, summary


def redecode(checkpoint: Path) -> int:
    """Recompute the decodes of a trained checkpoint (after PROMPTS changed) without retraining. The
    weights are what training left, so this equals what a full rerun would record for them."""
    _, Mamba2ForCausalLM, _ = import_mamba2_fallback()
    path = checkpoint / "training.json"
    record = json.loads(path.read_text())
    rows, summary = decode_report(Mamba2ForCausalLM.from_pretrained(checkpoint))
    print(json.dumps(summary))
    record |= {"prompts": list(PROMPTS), "decodes": rows, "margins": summary,
               "decodes_written_by": {"mode": "--redecode", "import": dispatch.import_record(),
                                      "versions": versions(), "threads": torch.get_num_threads()}}
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"rewrote decodes and margins in {path}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="checkpoint directory to write")
    ap.add_argument("--probe", type=int, help="time this many steps, write nothing")
    ap.add_argument("--redecode", type=Path, help="checkpoint directory: recompute its greedy decodes and "
                    "margins for PROMPTS and rewrite those entries of its training.json; no training")
    for f in ("steps", "batch", "seq_len", "threads", "seed"):
        ap.add_argument("--" + f.replace("_", "-"), type=int)
    ap.add_argument("--lr", type=float)
    args = ap.parse_args(argv)
    if sum(a is not None for a in (args.out, args.probe, args.redecode)) != 1:
        ap.error("give exactly one of --out, --probe and --redecode")
    overrides = {f: getattr(args, f) for f in ("steps", "batch", "seq_len", "threads", "seed", "lr")
                 if getattr(args, f) is not None}
    cfg = TrainConfig(**overrides)
    set_determinism(cfg.threads)
    if args.redecode:
        return redecode(args.redecode)
    t_start = time.perf_counter()
    train_ids, held_ids, files = load_corpus(cfg.heldout_every)
    print(f"corpus: {len(files)} files, train {train_ids.numel():,} bytes, held-out {held_ids.numel():,}")
    model, dispatch, curve, train_wall = train(cfg, train_ids, held_ids, args.probe)
    print(f"{param_count(model):,} parameters")
    if args.probe:
        print(f"probe: {args.probe} steps in {train_wall:.1f}s = {train_wall / args.probe:.2f} s/step "
              f"(batch {cfg.batch} x seq {cfg.seq_len})")
        return 0
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    held = random_windows(held_ids, cfg.eval_windows, cfg.seq_len, gen)
    train_eval = random_windows(train_ids, cfg.eval_windows, cfg.seq_len, gen)
    final = {"train_bits_per_byte": bits_per_byte(model, train_eval, cfg.batch),
             "heldout_bits_per_byte": bits_per_byte(model, held, cfg.batch),
             "eval_windows": cfg.eval_windows, "eval_seq_len": cfg.seq_len}
    print(json.dumps(final))
    rows, summary = decode_report(model)
    print(json.dumps(summary))

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    record = {
        "generator": "equiv_reference.mamba2.train_byte_model",
        "what": "byte-level Mamba-2 (transformers Mamba2ForCausalLM) trained on CPU on the Python "
                "standard library's top-level *.py; written by "
                "`python -m equiv_reference.mamba2.train_byte_model`",
        "train_config": asdict(cfg), "model_config": MODEL_KW, "parameters": param_count(model),
        "tokenizer": {"module": "equiv_reference.byte_tokenizer", "vocab_size": tok.VOCAB_SIZE,
                      "ids_used": tok.N_IDS_USED, "bos": tok.BOS_ID, "eos": tok.EOS_ID, "pad": tok.PAD_ID,
                      "file_separator": "eos"},
        "reference_path": {"import": dispatch.import_record(), "training_dispatch": dispatch},
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
