"""Packing: bins of whole rows without cross-contamination, and rows per step that never depend on packing."""

import random

import numpy as np
import pytest
import torch

from sft_ray.data import pad_collate
from sft_ray.packing import best_fit_decreasing, pack_rows, packed_collate


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
    bins = best_fit_decreasing([6, 5, 4, 5], 10)
    assert sorted(sorted(b) for b in bins) == [[0, 2], [1, 3]]
    assert best_fit_decreasing([12, 3], 10) == [[0], [1]]  # too long: its own bin, nothing added to it


def test_pack_rows_uses_as_few_bins_as_bfd_and_evens_them_out():
    rng = random.Random(1)
    for _ in range(200):
        cap = rng.randint(64, 512)
        lengths = [rng.randint(1, cap) for _ in range(rng.randint(1, 16))]
        bins = pack_rows(lengths, cap)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= cap for b in bins)
        assert len(bins) == len(best_fit_decreasing(lengths, cap))
    # eight rows of 40 tokens in 256-token bins: two bins of four, not 6 + 2
    assert sorted(len(b) for b in pack_rows([40] * 8, 256)) == [4, 4]


def test_collate_restarts_positions_and_ignores_first_labels():
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "example_id": "a:1"},
            {"input_ids": [8, 9], "labels": [-100, 9], "example_id": "a:2"},
            {"input_ids": [1, 2, 3], "labels": [1, 2, 3], "example_id": "a:3"}]
    b = packed_collate(rows, capacity=6, pad_id=0)
    assert b["input_ids"].shape == (2, 8) and "attention_mask" not in b and b["num_tokens"] == 8
    line = [i for i, ids in enumerate(b["input_ids"].tolist()) if ids[:5] in ([5, 6, 7, 8, 9], [8, 9, 5, 6, 7])]
    assert line, b["input_ids"]
    assert b["position_ids"][line[0], :5].tolist() == [0, 1, 2, 0, 1]
    assert (b["labels"][:, 0] == -100).all() and (b["input_ids"][line[0], 5:] == 0).all()
    assert sorted(b["example_id"]) == ["a:1", "a:2", "a:3"]
    f = packed_collate(rows, capacity=6, pad_id=0, flat=True)
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
    packed = packed_collate(rows, capacity=64, pad_id=smol_tok.pad_token_id)
    assert packed["input_ids"].shape[0] < len(rows)  # several rows share a line
    packed.pop("example_id")
    packed.pop("num_tokens")
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
    flat = packed_collate(rows, capacity=64, pad_id=smol_tok.pad_token_id, flat=True)
    for k in ("example_id", "num_tokens", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        flat.pop(k)
    assert torch.allclose(model(**flat).loss, model(**unpacked).loss, atol=1e-5)


class _Shard:
    """A stand-in for a worker's Ray Data shard: ``iter_batches`` over an in-memory list of rows."""

    def __init__(self, rows):
        self.rows = rows

    def iter_batches(self, batch_size, batch_format="numpy", prefetch_batches=0, local_shuffle_buffer_size=None,
                     local_shuffle_seed=None):
        for s in range(0, len(self.rows), batch_size):
            chunk = self.rows[s:s + batch_size]
            yield {k: np.array([r[k] for r in chunk] + [None], dtype=object)[:-1] for k in chunk[0]}


def _stream_rows(rows, packing, batch=4, accum=2, epochs=1.0, max_steps=None):
    from sft_ray.config import load_config
    from sft_ray.plan import plan_run
    from sft_ray.worker import Layout, TrainStream

    cfg = load_config(None, [f"train.per_device_batch_size={batch}", f"train.grad_accum={accum}",
                             "train.num_workers=1", f"train.num_epochs={epochs}", f"data.packing={packing}",
                             "data.max_length=256"] + ([f"train.max_steps={max_steps}"] if max_steps else []))
    plan = plan_run(cfg, len(rows), float(np.mean([len(r["input_ids"]) for r in rows])), False, "none")
    stream = TrainStream(_Shard(rows), plan, batch, accum, Layout(0, packing, 256), shuffle_buffer=0, seed=0)
    return plan, [sorted(b["example_id"]) for b in stream]


def _rows_of(lengths):
    return [{"input_ids": [7] * n, "labels": [7] * n, "example_id": f"r{i:03d}"} for i, n in enumerate(lengths)]


@pytest.mark.parametrize("packing", [False, True])
def test_rows_per_step_and_steps_per_epoch_do_not_depend_on_row_length(packing):
    short, long = _rows_of([40] * 50), _rows_of([200 + i % 50 for i in range(50)])
    p_short, b_short = _stream_rows(short, packing)
    p_long, b_long = _stream_rows(long, packing)
    # 50 rows, 4 rows x accum 2 per step: 7 steps (6 full, a last one of 2 rows), whatever the row length
    assert p_short.max_steps == p_long.max_steps == p_short.steps_per_epoch == 7
    assert p_short.rows_per_step == 8 and p_short.tokens_per_step < p_long.tokens_per_step
    assert [len(b) for b in b_short] == [len(b) for b in b_long] == [4] * 12 + [1, 1]
    # an exact epoch: every row once
    assert sorted(i for b in b_short for i in b) == [r["example_id"] for r in short]


def test_packed_and_unpacked_micro_batches_hold_the_same_rows():
    rows = _rows_of([random.Random(i).randint(10, 120) for i in range(37)])
    _, packed = _stream_rows(rows, True, batch=3, accum=1, epochs=2)
    _, unpacked = _stream_rows(rows, False, batch=3, accum=1, epochs=2)
    assert packed == unpacked and len(packed) == 25  # 74 rows over two epochs, 3 per step
    ids = [i for b in packed for i in b]
    assert sorted(ids) == sorted([r["example_id"] for r in rows] * 2)


def test_max_steps_takes_full_steps_across_epochs():
    _, batches = _stream_rows(_rows_of([30] * 10), True, batch=4, accum=1, max_steps=5)
    assert [len(b) for b in batches] == [4] * 5  # 20 rows: two passes over 10 rows
