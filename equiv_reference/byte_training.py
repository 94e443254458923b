"""What the families' trained byte-level fixtures share: the corpus (the Python standard library's
own top-level sources), its windows, bits per byte, the optimizer and schedule, determinism settings,
the decode prompts and the version record. Each family's train_byte_model.py builds and trains its own
model with these, so the fixtures are trained and judged alike."""

from __future__ import annotations

import hashlib
import math
import platform
import sys
import sysconfig
from pathlib import Path

import torch

from equiv_reference import byte_tokenizer as tok

# Short prompts (the model's greedy continuations of these fall into whitespace runs after a line or
# two) and two with more context (continuations stay code-like for all 64 bytes).
PROMPTS = ("def ", "import os\n", "class ", "    return ", "for i in range(",
           "    def __repr__(self):\n        return ", "        raise ValueError(")
N_NEW_TOKENS = 64


def set_determinism(threads: int) -> None:
    torch.use_deterministic_algorithms(True)
    # Deterministic mode also NaN-fills every torch.empty (13% of a step here); no op we run reads
    # uninitialised memory, so the fill buys nothing.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.set_num_threads(threads)


def stdlib_files() -> list[Path]:
    """The top-level `*.py` of the standard library, sorted by name: ~170 files, ~4.7 MB on 3.11."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(root.glob("*.py"), key=lambda p: p.name)


def load_corpus(heldout_every: int):
    """Returns (train ids, held-out ids, file records). Files are joined with EOS between them; every
    `heldout_every`-th file (index % k == k // 2) is held out whole, so held-out text is unseen text."""
    train, held, records = [], [], []
    for i, path in enumerate(stdlib_files()):
        data = path.read_bytes()
        split = "heldout" if i % heldout_every == heldout_every // 2 else "train"
        (held if split == "heldout" else train).extend([*data, tok.EOS_ID])
        records.append({"name": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                        "split": split})
    return torch.tensor(train, dtype=torch.long), torch.tensor(held, dtype=torch.long), records


def random_windows(stream, n, length, gen):
    """n windows of `length` + 1 tokens (input and shifted target) at random offsets: (b, l+1)."""
    starts = torch.randint(0, stream.numel() - length - 1, (n,), generator=gen)
    return torch.stack([stream[s:s + length + 1] for s in starts.tolist()])


def bits_per_byte(model, windows, batch):
    """Mean next-token cross-entropy over (b, l+1) windows, in bits."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            w = windows[i:i + batch]
            logits = model(input_ids=w[:, :-1]).logits                                  # (b, l, v)
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(),
                                                       reduction="sum").item()
    model.train()
    return total / (windows[:, 1:].numel() * math.log(2))


def make_optimizer(model, cfg):
    """AdamW and its schedule from cfg's lr, warmup, steps, final_lr_frac and weight_decay."""
    # Decay matrices only (nanoGPT's rule): norms, A_log, D, dt_bias and conv bias stay undecayed.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)

    def lr_at(step):  # linear warmup, then cosine down to final_lr_frac * lr
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied lm_head is the embedding: counted once


def versions() -> dict:
    import numpy
    import safetensors
    import transformers

    return {"python": sys.version.split()[0], "implementation": platform.python_implementation(),
            "platform": platform.platform(), "machine": platform.machine(), "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__,
            "numpy": numpy.__version__}
