"""The Mamba-3 family (mamba_ssm 2.3.2.post1's `Mamba3` blocks in its `MambaLMHeadModel` layout,
docs/mamba3-layout.md): what the harness needs to know, by name (equiv/families.py).

References: `mamba_ssm` runs mamba_ssm's own kernels (Triton SISO, TileLang MIMO, CuTe decode step),
so it needs a CUDA GPU; `oracle` is the project's numpy Mamba-3 (equiv/mamba3/oracle.py), float64
the oracle and float32 an independent float32 run of the same recurrence, on any machine, hence
the default. The SSM property suite takes its budget from two numpy float32 runs of the oracle's
recurrence pooled (as written, and correctly rounded: equiv/mamba3/ssm_numpy.py), live and golden
alike (no torch float32 counterpart yet).
"""

from equiv.families import Family, PropertySuite

FAMILY = Family(
    name="mamba3",
    title="Mamba-3",
    model_types=("mamba3",),
    mamba_ssm_layers=("Mamba3",),
    ports={"builtin": "equiv.mamba3.port:Mamba3Port"},
    references={"mamba_ssm": "equiv_reference.mamba3.references:mamba_ssm",
                "oracle": "equiv_reference.mamba3.references:oracle"},
    default_reference="oracle",
    properties=PropertySuite("Mamba-3 SSM duality", run="equiv.mamba3.ssm_properties:run_ssm_properties",
                             references="equiv.mamba3.ssm_numpy:NumpySSMReferences",
                             torch_free_references="equiv.mamba3.ssm_numpy:NumpySSMReferences"),
    fixture_builders=("equiv_reference.mamba3.make_fixtures",),
    trained_fixtures={},
    # its SISO kernel rounds q, k, x, trap, angles and z to bfloat16 in a float32 model (notes below)
    recorded_references={"mamba_ssm": "bfloat16"},
    notes={"untrained": "no trained Mamba-3 fixture: mamba_ssm's Mamba-3 trains only through its GPU "
                        "kernels; greedy decode on the random fixtures is judged with the near-tie "
                        "classification (equiv/decode.py)",
           "mamba_ssm": "needs a CUDA GPU (its Mamba-3 kernels); its SISO path rounds q, k, x, trap, angle "
                        "and z to bfloat16 even in a float32 model",
           "record mamba_ssm": "`python -m equiv_reference.mamba3.record_kernels --out fixtures/golden "
                               "--torch-step` on a CUDA GPU (TileLang importable for the MIMO fixture)",
           "A": "mamba_ssm 2.3.2.post1's A = -softplus(dd_A); its main branch's heavy-tail activation "
                "reads the same checkpoint keys with other math (docs/mamba3-layout.md)"},
)
