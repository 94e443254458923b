"""The Mamba-2 family (SSD): what the harness needs to know, by name (equiv/families.py)."""

from equiv.families import Family, PropertySuite

FAMILY = Family(
    name="mamba2",
    title="Mamba-2",
    model_types=("mamba2",),
    mamba_ssm_layers=("Mamba2",),
    ports={"builtin": "equiv.mamba2.port:Mamba2Port",
           "mamba2-jax": "equiv.mamba2.mamba2_jax_adapter:Mamba2JaxPort"},
    references={"transformers": "equiv_reference.mamba2.references:transformers",
                "mamba_ssm": "equiv_reference.mamba2.references:mamba_ssm"},
    default_reference="transformers",
    properties=PropertySuite("SSD duality", run="equiv.mamba2.ssd_properties:run_ssd_properties",
                             references="equiv_reference.mamba2.ssd_references:TorchSSDReferences",
                             torch_free_references="equiv.mamba2.ssd_numpy:NumpySSDReferences"),
    fixture_builders=("equiv_reference.mamba2.make_fixtures",),
    trained_fixtures={"trained-bytes": "equiv_reference.mamba2.train_byte_model"},
    streaming={"port": "equiv.mamba2.layer_stream:stream_port",
               "reference": "equiv_reference.mamba2.layer_stream:stream_transformers"},
    sharding="equiv.mamba2.sharded_vs_unsharded",
)
