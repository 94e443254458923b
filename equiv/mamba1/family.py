"""The Mamba-1 family (selective scan, S6), with Falcon-Mamba as a config variant of it: what the
harness needs to know, by name (equiv/families.py)."""

from equiv.families import Family, PropertySuite

FAMILY = Family(
    name="mamba1",
    title="Mamba-1",
    model_types=("mamba", "falcon_mamba"),
    mamba_ssm_layers=("Mamba1",),
    ports={"builtin": "equiv.mamba1.port:Mamba1Port"},
    references={"transformers": "equiv_reference.mamba1.references:transformers"},
    default_reference="transformers",
    properties=PropertySuite("selective-scan duality", run="equiv.mamba1.scan_properties:run_scan_properties",
                             references="equiv_reference.mamba1.scan_references:TorchScanReferences",
                             torch_free_references="equiv.mamba1.scan_numpy:NumpyScanReferences"),
    fixture_builders=("equiv_reference.mamba1.make_fixtures",),
    trained_fixtures={"mamba1-trained-bytes": "equiv_reference.mamba1.train_byte_model"},
)
