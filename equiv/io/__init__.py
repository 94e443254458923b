"""Reading and writing what the suite is given, for every family: the one bounded reader every
file goes through (bounded), strict JSON objects (json_reader), safetensors (safetensors_io), a
pytorch_model.bin checked before torch.load (torch_bin), a checkpoint directory's tensors in any of
the layouts transformers reads and the preflight of what a reference library will open
(checkpoint_files), and a trained checkpoint's training.json (training_json)."""
