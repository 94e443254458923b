"""ssm-equiv: numerical-equivalence verification for JAX ports of PyTorch state-space models.

Dimension letters, used in every einsum and shape comment on both the JAX and the torch side:

    b batch     l length (tokens)   h heads       p head dim     n state size
    g groups    r heads per group   c chunks      q/s positions inside a chunk
    k conv width   d model width    e d_inner (= h * p)   v vocabulary

Nothing in this package imports torch at import time.
"""

__version__ = "0.1.0"
