"""Canonical tap names for Mamba-1 and Falcon-Mamba: the one list the port and the reference runners
use.

Every tap is batch-first float, layout (b, l, ...); e = d_inner, r = dt_rank (time_step_rank),
n = d_state:

    embed                       (b, l, d)   token embedding
    layers.{i}.norm             (b, l, d)   pre-mixer RMSNorm
    layers.{i}.mixer.in_proj    (b, l, 2e)  x | z, in_proj's output (with its bias if use_bias)
    layers.{i}.mixer.conv       (b, l, e)   causal depthwise conv (+ bias) + SiLU, padded positions zeroed
    layers.{i}.mixer.x_proj.dt  (b, l, r)   x_proj's dt slice (Falcon-Mamba: after its RMS norm)
    layers.{i}.mixer.x_proj.B   (b, l, n)   x_proj's B slice (Falcon-Mamba: after its RMS norm)
    layers.{i}.mixer.x_proj.C   (b, l, n)   x_proj's C slice (Falcon-Mamba: after its RMS norm)
    layers.{i}.mixer.dt_proj    (b, l, e)   dt_proj(dt) with its bias, before the softplus
    layers.{i}.mixer.ssm        (b, l, e)   selective scan output including D * x, before the gate
    layers.{i}.mixer.gate       (b, l, e)   ssm * silu(z)
    layers.{i}.mixer.out_proj   (b, l, d)   mixer output
    layers.{i}                  (b, l, d)   block output: residual + mixer (float32 if residual_in_fp32)
    norm_f                      (b, l, d)   final RMSNorm
    logits                      (b, l, v)
"""

LAYER_SUBTAPS = ("norm", "mixer.in_proj", "mixer.conv", "mixer.x_proj.dt", "mixer.x_proj.B", "mixer.x_proj.C",
                 "mixer.dt_proj", "mixer.ssm", "mixer.gate", "mixer.out_proj")


def layer_taps(i: int) -> list[str]:
    return [f"layers.{i}.{sub}" for sub in LAYER_SUBTAPS] + [f"layers.{i}"]


def tap_names(n_layers: int) -> list[str]:
    """All taps in execution order."""
    names = ["embed"]
    for i in range(n_layers):
        names += layer_taps(i)
    return names + ["norm_f", "logits"]
