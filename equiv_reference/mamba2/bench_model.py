"""The benchmark's model and its cost on this machine.

The model: a Mamba-2 with the shapes of state-spaces/mamba2-130m and random weights.

No model hub is reachable, and speed does not depend on the weights' values, so the checkpoint is
built once with transformers (its own initialisation, seed 0, float32) and cached; a config
marker makes a changed shape rebuild it. Shapes (mamba2-130m): d_model 768, 24 layers, d_state 128,
head_dim 64 (24 heads), expand 2, n_groups 1, vocab 50280, conv 4, chunk 256, tied embeddings.

The cost: matmul FLOPs per token (projections, and the chunked SSD's einsums, which depend on the
chunk), the bytes a decode step must read, and this machine's measured float32 matmul throughput
and matvec bandwidth; together they bound what any float32 implementation can reach here.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

BENCH_130M = dict(
    vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=128, head_dim=64, num_heads=24,
    expand=2, n_groups=1, conv_kernel=4, chunk_size=256, tie_word_embeddings=True, use_bias=False,
    use_conv_bias=True, residual_in_fp32=True, layer_norm_epsilon=1e-5,
)
SEED = 0
PREFILL_LEN = 512
DEFAULT_CACHE = Path(os.environ.get("SSM_EQUIV_CACHE", Path.home() / ".cache" / "ssm-equiv")) / "bench-130m"
_MARKER = "bench-config.json"


def matmul_flops_per_token(cfg: dict = BENCH_130M, with_head: bool = False) -> int:
    """Multiply-adds x 2 of the projections per token (in_proj + out_proj per layer, optionally the
    tied head). The SSD's own einsums are counted separately: they depend on the chunk size."""
    d, e, n, h, g = (cfg["hidden_size"], cfg["expand"] * cfg["hidden_size"], cfg["state_size"],
                     cfg["num_heads"], cfg["n_groups"])
    in_dim = 2 * e + 2 * g * n + h
    per_layer = d * in_dim + e * d
    return 2 * (cfg["num_hidden_layers"] * per_layer + (d * cfg["vocab_size"] if with_head else 0))


def ssd_flops_per_token(chunk: int, cfg: dict = BENCH_130M) -> int:
    """The chunked SSD's matmul work per token (all layers): intra-chunk C.B^T (q n g) and its product
    with x (q h p), the chunk states (h p n) and their contribution to y (h p n)."""
    e, n, g = cfg["expand"] * cfg["hidden_size"], cfg["state_size"], cfg["n_groups"]
    return 2 * cfg["num_hidden_layers"] * (chunk * n * g + chunk * e + 2 * e * n)


def weight_bytes(cfg: dict = BENCH_130M) -> int:
    """float32 bytes a decode step must read: every layer's weights plus the (tied) head."""
    d, e, n, h, g, k = (cfg["hidden_size"], cfg["expand"] * cfg["hidden_size"], cfg["state_size"],
                        cfg["num_heads"], cfg["n_groups"], cfg["conv_kernel"])
    in_dim, conv_dim = 2 * e + 2 * g * n + h, e + 2 * g * n
    per_layer = d * in_dim + e * d + conv_dim * (k + 1) + 3 * h + e + d
    return 4 * (cfg["num_hidden_layers"] * per_layer + d * cfg["vocab_size"] + d)


def build_bench_checkpoint(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """The cached checkpoint directory, built on first use (about 10 s and 0.5 GB)."""
    cache_dir = Path(cache_dir)
    marker = cache_dir / _MARKER
    want = {"config": BENCH_130M, "seed": SEED}
    if marker.is_file() and (cache_dir / "model.safetensors").is_file():
        try:
            if json.loads(marker.read_text()) == want:
                return cache_dir
        except (OSError, ValueError):
            pass
    from equiv_reference.mamba2.dispatch import import_modeling_mamba2

    mm = import_modeling_mamba2()  # kernel packages hidden: nothing CUDA-bound gets imported
    from transformers import Mamba2Config

    torch.manual_seed(SEED)
    model = mm.Mamba2ForCausalLM(Mamba2Config(**BENCH_130M)).to(torch.float32).eval()
    cache_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cache_dir)
    marker.write_text(json.dumps(want, indent=1))
    return cache_dir


def _wall(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure_peaks(quick: bool) -> dict:
    """fp32 matmul GFLOP/s (XLA and torch, a prefill-shaped in_proj matmul) and matvec read
    bandwidth GB/s (XLA, a decode-shaped product with a 256 MB matrix)."""
    reps = 3 if quick else 5
    d, e, n, h = (BENCH_130M[k] for k in ("hidden_size", "expand", "state_size", "num_heads"))
    in_dim = 2 * e * d + 2 * n + h  # n_groups 1: the in_proj of the benchmark model
    a = np.random.default_rng(0).standard_normal((PREFILL_LEN, d), dtype=np.float32)
    w = np.random.default_rng(1).standard_normal((d, in_dim), dtype=np.float32)
    flops = 2 * PREFILL_LEN * d * in_dim
    mm = jax.jit(jnp.matmul)
    ja, jw = jnp.asarray(a), jnp.asarray(w)
    jax.block_until_ready(mm(ja, jw))
    xla = min(_wall(lambda: jax.block_until_ready(mm(ja, jw))) for _ in range(reps * 4))
    ta, tw = torch.from_numpy(a), torch.from_numpy(w)
    torch.matmul(ta, tw)
    tt = min(_wall(lambda: torch.matmul(ta, tw)) for _ in range(reps * 4))
    big = jnp.asarray(np.random.default_rng(2).standard_normal((4096, 16384), dtype=np.float32))
    vec = jnp.ones((1, 4096), jnp.float32)
    mv = jax.jit(jnp.matmul)
    jax.block_until_ready(mv(vec, big))
    t_mv = statistics.median(_wall(lambda: jax.block_until_ready(mv(vec, big))) for _ in range(reps * 2))
    return {"xla_matmul_gflops": flops / xla / 1e9, "torch_matmul_gflops": flops / tt / 1e9,
            "matvec_read_gbps": big.size * 4 / t_mv / 1e9,
            "matmul_shape": f"({PREFILL_LEN}, {d}) @ ({d}, {in_dim}) float32",
            "matvec_matrix_mb": big.size * 4 / 1e6}


def ceilings(peaks: dict) -> dict:
    """The best any float32 implementation can do here: prefill at the measured matmul peak (the
    faster of XLA and torch), decode at the measured matvec bandwidth reading every weight once."""
    gf = max(peaks["xla_matmul_gflops"], peaks["torch_matmul_gflops"]) * 1e9
    proj = matmul_flops_per_token()
    out = {"projection_mflop_per_token": proj / 1e6,
           "prefill_tokens_per_s_ceiling_projections_only": gf / proj}
    for chunk in (256, 64):
        total = proj + ssd_flops_per_token(chunk)
        out[f"ssd_mflop_per_token_chunk{chunk}"] = ssd_flops_per_token(chunk) / 1e6
        out[f"prefill_tokens_per_s_ceiling_chunk{chunk}"] = gf / total
    out["decode_weight_mb_per_token"] = weight_bytes() / 1e6
    out["decode_ms_per_token_floor"] = 1e3 * weight_bytes() / (peaks["matvec_read_gbps"] * 1e9)
    return out
