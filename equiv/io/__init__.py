"""Reading and writing what the suite is given, for every family: strict JSON objects
(json_reader), safetensors (safetensors_io), and a checkpoint directory's tensors in any of the
layouts transformers reads (checkpoint_files)."""
