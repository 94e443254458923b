"""Layer-streamed verification, for checkpoints bigger than memory: each side (port, reference,
float64 oracle) runs stage by stage (embedding, each layer, head), holding one stage's weights at a
time, and every tap is compared as soon as its stage has run on all sides (docs/streaming.md).

protocol.py  what a family provides (Family.streaming): per-stage loaders and runners
driver.py    the generic driver: the same LayerwiseResult as equiv.layerwise.run_layerwise, and the
             teacher-forced decode match
memory.py    peak resident memory, and what an in-memory run would need (the automatic switch)
cli.py       `equiv diff --stream`
"""
