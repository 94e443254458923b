"""Canonical tap names for Mamba-2: the one list both the port and the reference runners use.

Every tap is batch-first float, layout (b, l, ...):

    embed                     (b, l, d)   token embedding
    layers.{i}.norm           (b, l, d)   pre-mixer RMSNorm
    layers.{i}.mixer.in_proj  (b, l, 2e + 2gn + h)   z | xBC | dt, before any activation
    layers.{i}.mixer.conv     (b, l, e + 2gn)        causal depthwise conv + bias + SiLU, padding masked
    layers.{i}.mixer.ssm      (b, l, e)   SSD output including the D skip, before the gated norm
    layers.{i}.mixer.gated_norm (b, l, e) RMSNorm(y * silu(z)) per group
    layers.{i}.mixer.out_proj (b, l, d)   mixer output
    layers.{i}                (b, l, d)   block output: residual + mixer (float32 if residual_in_fp32)
    norm_f                    (b, l, d)   final RMSNorm
    logits                    (b, l, v)
"""

LAYER_SUBTAPS = ("norm", "mixer.in_proj", "mixer.conv", "mixer.ssm", "mixer.gated_norm", "mixer.out_proj")


def layer_taps(i: int) -> list[str]:
    return [f"layers.{i}.{sub}" for sub in LAYER_SUBTAPS] + [f"layers.{i}"]


def tap_names(n_layers: int) -> list[str]:
    """All taps in execution order."""
    names = ["embed"]
    for i in range(n_layers):
        names += layer_taps(i)
    return names + ["norm_f", "logits"]
