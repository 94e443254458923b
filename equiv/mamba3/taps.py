"""Canonical tap names for Mamba-3: the one list the port, the float64 oracle and the reference
runners use.

Every tap is batch-first float, layout (b, l, ...); e = d_inner, h = nheads (e / headdim),
n = d_state, g = ngroups, R = mimo_rank (1 without MIMO), a = num_rope_angles (rotated pairs):

    embed                       (b, l, d)        token embedding
    layers.{i}.norm             (b, l, d)        pre-mixer RMSNorm
    layers.{i}.mixer.in_proj    (b, l, 2e+2Rgn+3h+a)
                                                 z | x | B | C | dd_dt | dd_A | trap | angle, raw
    layers.{i}.mixer.dt         (b, l, h)        dt = softplus(dd_dt + dt_bias)
    layers.{i}.mixer.A          (b, l, h)        A = min(-softplus(dd_A), -A_floor): the floored,
                                                 data-dependent decay rate (the decay is exp(A dt))
    layers.{i}.mixer.trap       (b, l, h)        trap = sigmoid(trap_raw), the trapezoid's mix lambda
    layers.{i}.mixer.angles     (b, l, h, a)     cumulative rotary angle
                                                 theta_t = sum_{s<=t} pi tanh(angle_s) dt_s,
                                                 NOT reduced mod 2 pi (a reduction jumps by 2 pi
                                                 where two correct sides round differently)
    layers.{i}.mixer.B          (b, l, R, h, n)  B_norm(B) + B_bias, per head, before the rotation
    layers.{i}.mixer.C          (b, l, R, h, n)  C_norm(C) + C_bias, per head, before the rotation
    layers.{i}.mixer.ssm        (b, l, R, e)     per-rank SSM read-out including the D skip,
                                                 y_r = C~_r . h + D x_r (x_r = x * mimo_x[r]; x
                                                 itself without MIMO), before any gate
    layers.{i}.mixer.gate       (b, l, e)        what out_proj receives: y * silu(z), or the gated
                                                 RMSNorm norm(y) * silu(z) when is_outproj_norm;
                                                 with MIMO per rank with z_r = z * mimo_z[r], then
                                                 summed over ranks weighted by mimo_o
    layers.{i}.mixer.out_proj   (b, l, d)        mixer output
    layers.{i}                  (b, l, d)        block output: residual + mixer (float32 if
                                                 residual_in_fp32)
    norm_f                      (b, l, d)        final RMSNorm
    logits                      (b, l, v)

The rotation itself has no tap of its own: it is fixed by `angles` (which angle) and exercised by
`ssm` (the only op that reads rotated B and C); an angle defect shows at `angles`, a pairing
defect at `ssm`.
"""

LAYER_SUBTAPS = ("norm", "mixer.in_proj", "mixer.dt", "mixer.A", "mixer.trap", "mixer.angles", "mixer.B",
                 "mixer.C", "mixer.ssm", "mixer.gate", "mixer.out_proj")


def layer_taps(i: int) -> list[str]:
    return [f"layers.{i}.{sub}" for sub in LAYER_SUBTAPS] + [f"layers.{i}"]


def tap_names(n_layers: int) -> list[str]:
    """All taps in execution order."""
    names = ["embed"]
    for i in range(n_layers):
        names += layer_taps(i)
    return names + ["norm_f", "logits"]
