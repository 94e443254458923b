"""The trained byte-level fixture (fixtures/trained-bytes, written by
`equiv_reference.mamba2.train_byte_model`): it
loads through transformers' torch fallback, is the size the design says, and greedy-decodes today what it
decoded when it was trained. A changed checkpoint, a changed transformers or a broken torch shows up here.
No training: ~2 s of loading and five 64-token decodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from equiv_reference import byte_tokenizer as tok

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "trained-bytes"
MAX_BYTES = 10 * 2**20
# A recomputed top-1/top-2 margin may differ from the recorded one by float32 summation order (other
# thread counts, other BLAS); 1e-3 logits is ~100x that, far below any margin a flip would need.
MARGIN_ATOL = 1e-3


@pytest.fixture(scope="module")
def record():
    return json.loads((FIXTURE / "training.json").read_text())


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import torch

    # greedy_decode runs every forward under equiv_reference.provenance.DispatchRecorder: torch bodies only,
    # whichever module imported transformers' Mamba-2 first.
    from equiv_reference.mamba2.train_byte_model import import_mamba2_fallback, set_determinism

    _, Mamba2ForCausalLM, _ = import_mamba2_fallback()
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    set_determinism(json.loads((FIXTURE / "training.json").read_text())["threads"])
    yield Mamba2ForCausalLM.from_pretrained(FIXTURE).eval()
    torch.set_num_threads(saved[0])  # leave the process as we found it
    torch.use_deterministic_algorithms(saved[1])
    torch.utils.deterministic.fill_uninitialized_memory = saved[2]


def test_fixture_size_and_files():
    names = sorted(p.name for p in FIXTURE.iterdir())
    assert {"config.json", "model.safetensors", "training.json"} <= set(names), names
    total = sum(p.stat().st_size for p in FIXTURE.iterdir())
    assert total < MAX_BYTES, f"fixtures/trained-bytes is {total:,} B, expected < {MAX_BYTES:,} B"


def test_config_matches_tokenizer(record):
    cfg = json.loads((FIXTURE / "config.json").read_text())
    assert cfg["model_type"] == "mamba2"
    assert (cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (
        tok.VOCAB_SIZE, tok.BOS_ID, tok.EOS_ID, tok.PAD_ID)
    assert record["tokenizer"]["vocab_size"] == tok.VOCAB_SIZE
    assert cfg["n_groups"] > 1, "g > 1 keeps the group-wise bugs (docs/porting-bugs.md #1, #2) visible"
    assert cfg["chunk_size"] < record["train_config"]["seq_len"]


def test_parameter_count(model, record):
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n <= 5_000_000, f"expected 1-5 M parameters, got {n:,}"
    assert n == record["parameters"]
    assert model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr(), "expected tied"


def test_training_reached_its_target(record):
    # The reason this fixture exists: peaked greedy decodes. Record-level, so a retrain that fell
    # short is caught before anyone relies on it.
    assert record["final"]["heldout_bits_per_byte"] < 2.5
    assert record["margins"]["margin_median"] > 1.0


def test_greedy_decodes_reproduce_the_record(model, record):
    from equiv_reference.mamba2.train_byte_model import greedy_decode

    assert len(record["decodes"]) >= 4
    problems = []
    for row in record["decodes"]:
        ids, margins = greedy_decode(model, row["prompt"], n_new=len(row["continuation_ids"]))
        if ids != row["continuation_ids"]:
            first = next((i for i, (a, b) in enumerate(zip(ids, row["continuation_ids"])) if a != b),
                         min(len(ids), len(row["continuation_ids"])))
            want = tok.decode(row["continuation_ids"])
            problems.append(f"{row['prompt']!r}: expected {want!r}, got {tok.decode(ids)!r} "
                            f"(first difference at new token {first})")
        elif abs(min(margins) - row["margin_min"]) > MARGIN_ATOL:
            problems.append(f"{row['prompt']!r}: smallest top-1/top-2 margin expected "
                            f"{row['margin_min']:.5f}, got {min(margins):.5f}")
    assert not problems, "; ".join(problems)


def test_byte_tokenizer_round_trip_and_specials():
    text = "def f(x):\n    return 'é∑'\n"
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == tok.BOS_ID and max(ids[1:]) < 256
    assert tok.decode(ids) == text
    assert tok.decode([*ids, tok.EOS_ID], skip_specials=False) == "<bos>" + text + "<eos>"
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"  # a cut multi-byte char is replaced, not raised


@pytest.mark.parametrize("bad", [[tok.N_IDS_USED], [-1], [True], [1.0]])
def test_byte_tokenizer_rejects_bad_ids(bad):
    from equiv.errors import TokenRangeError

    with pytest.raises(TokenRangeError, match="expected"):
        tok.decode(bad)
