"""Packing: best-fit-decreasing bins, and a packed batch trains exactly like the same rows unpacked."""

import random

import numpy as np
import pytest
import torch

from sft_ray.data import pad_collate
from sft_ray.packing import best_fit_decreasing, expected_bins, pack_stream, packed_collate


def test_bfd_places_every_row_once_within_capacity():
    rng = random.Random(0)
    for _ in range(50):
        cap = rng.randint(16, 300)
        lengths = [rng.randint(1, cap) for _ in range(rng.randint(1, 200))]
        bins = best_fit_decreasing(lengths, cap)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= cap for b in bins)
        # never worse than the trivial lower bound by more than BFD's known 11/9 factor (+1)
        assert len(bins) <= 11 / 9 * np.ceil(sum(lengths) / cap) + 1


def test_bfd_is_best_fit_not_first_fit():
    # 6 goes first into bin A (room 4), 5 into bin B (room 5); 4 fits both: best fit puts it in A (exactly full),
    # so 5 still has room for the last 5. First fit would give the same here, next fit would not; check bins.
    bins = best_fit_decreasing([6, 5, 4, 5], 10)
    assert sorted(sorted(b) for b in bins) == [[0, 2], [1, 3]]
    assert best_fit_decreasing([12, 3], 10) == [[0], [1]]  # too long: its own bin, nothing added to it


def test_expected_bins_matches_packing():
    rng = np.random.default_rng(1)
    lengths = rng.integers(20, 200, size=3000)
    per_row = expected_bins(lengths, 256, window=1000, sample=3000, seed=0)
    windows = [{"input_ids": [[1] * n for n in lengths[s:s + 1000]], "labels": [[1] * n for n in lengths[s:s + 1000]]}
               for s in range(0, 3000, 1000)]
    real = sum(len(b) for b in pack_stream(windows, 256, 1))
    assert abs(per_row * 3000 - real) <= 3


def test_collate_restarts_positions_and_ignores_first_labels():
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "example_id": "a:1"},
            {"input_ids": [8, 9], "labels": [-100, 9], "example_id": "a:2"}]
    b = packed_collate([rows, rows[:1]], pad_id=0)
    assert b["input_ids"].shape == (2, 8) and "attention_mask" not in b
    assert b["position_ids"][0, :5].tolist() == [0, 1, 2, 0, 1]
    assert b["labels"][0, :5].tolist() == [-100, 6, 7, -100, 9]
    assert (b["labels"][0, 5:] == -100).all() and (b["input_ids"][0, 5:] == 0).all()
    assert b["position_ids"][1].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]  # padding is a sequence of its own
    assert b["example_id"] == ["a:1", "a:2", "a:1"]
    f = packed_collate([rows, rows[:1]], pad_id=0, flat=True)
    assert f["input_ids"].shape == (1, 8)
    assert f["cu_seq_lens_q"].tolist() == [0, 3, 5, 8] and f["max_length_q"] == 3


def _model(smol_tok, attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smol_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


def _rows(smol_tok, n=9):
    rng = random.Random(3)
    rows = []
    for i in range(n):
        length = rng.randint(4, 40)
        ids = [rng.randrange(len(smol_tok)) for _ in range(length)]
        prompt = rng.randint(1, length - 2)  # loss only on the "answer" part, as the data pipeline masks it
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "example_id": f"r:{i}"})
    return rows


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_token_weighted_unpacked_loss(smol_tok, attn):
    model = _model(smol_tok, attn)
    rows = _rows(smol_tok)
    unpacked = pad_collate({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]},
                           pad_id=smol_tok.pad_token_id)
    # HF's causal-LM loss is the mean over all trained (shifted) tokens of the batch: token-weighted
    ref = model(**unpacked).loss
    bins = [[rows[i] for i in b] for b in best_fit_decreasing([len(r["input_ids"]) for r in rows], 64)]
    assert len(bins) < len(rows) and any(len(b) > 1 for b in bins)
    packed = packed_collate(bins, pad_id=smol_tok.pad_token_id)
    packed.pop("example_id")
    out = model(**packed)
    assert torch.allclose(out.loss, ref, rtol=0, atol=1e-5), (out.loss.item(), ref.item())

    # the same gradients too
    model.zero_grad()
    model(**unpacked).loss.backward()
    g_ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(**packed).loss.backward()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_ref, [p.grad for p in model.parameters()]))

    # the test can fail: positions that do not restart (attention across sequences) change the loss
    # (and a KV cache being built switches transformers' packed-sequence detection off: the batch says use_cache=False)
    assert packed["use_cache"] is False
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
    assert abs(model(**leaky).loss.item() - ref.item()) > 1e-3


def test_flat_packing_without_flash_attention_is_still_per_sequence(smol_tok):
    """flat=True is meant for flash-attention varlen; on sdpa the position_ids still confine attention."""
    model = _model(smol_tok, "sdpa")
    rows = _rows(smol_tok, 5)
    unpacked = pad_collate({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]},
                           pad_id=smol_tok.pad_token_id)
    flat = packed_collate([[r] for r in rows], pad_id=smol_tok.pad_token_id, flat=True)
    for k in ("example_id", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        flat.pop(k)
    assert torch.allclose(model(**flat).loss, model(**unpacked).loss, atol=1e-5)
