"""The seeded global order the trainers receive: weighted sources are mixed through the whole epoch in
proportion to their weights, copies of a row are spread apart, and the order is the same on every attempt."""

import json
from collections import Counter

import pytest

from sft_ray.cluster import Fit
from sft_ray.config import load_config
from sft_ray.train import prepare_data

pytestmark = pytest.mark.usefixtures("ray_local")

TOLERANCE = 0.15  # a source's share in any tenth of a worker's epoch, against its weight's share


def _source(path, tag, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{tag} {i}"},
                                             {"role": "assistant", "content": tag}]}) + "\n")
    return str(path)


def _shards(tmp_path, tiny_model_dir, a, b, wa, wb):
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train=[{a}, {b}]", f"data.weights={{{a}: {wa}, {b}: {wb}}}",
                             "train.num_workers=2", "train.trace_examples=true", f"output_dir={tmp_path}"])
    prep = prepare_data(cfg, [a, b], [], Fit(10, None, 3, 0, 3, 1))
    return [[r["example_id"] for r in prep.datasets[f"train_{w}"].iter_rows()] for w in range(2)], prep


@pytest.mark.parametrize("wa, wb", [(1, 1), (3, 1)])
def test_sources_are_mixed_through_the_epoch_by_weight(tmp_path, tiny_model_dir, wa, wb):
    a, b = _source(tmp_path / "a.jsonl", "alpha", 600), _source(tmp_path / "b.jsonl", "beta", 600)
    shards, prep = _shards(tmp_path, tiny_model_dir, a, b, wa, wb)
    assert prep.rows == 600 * (wa + wb)
    want = wa / (wa + wb)
    for ids in shards:
        assert len(ids) == 600 * (wa + wb) // 2
        tenth = len(ids) // 10
        for k in range(10):
            part = ids[k * tenth:(k + 1) * tenth]
            share = sum(i.startswith(a) for i in part) / len(part)
            assert abs(share - want) <= TOLERANCE, (k, share, want)
    every = shards[0] + shards[1]
    assert len(set(every)) == len(every)  # each copy once
    if wa == 3:  # the three copies of a row lie far apart, not side by side
        where = {i: n for n, i in enumerate(every)}
        gaps = [abs(where[f"{a}:{r}#1"] - where[f"{a}:{r}"]) for r in range(1, 601)]
        assert sum(gaps) / len(gaps) > 200 and Counter(g == 1 for g in gaps)[True] < 10
    # the same order on every attempt (a restarted driver or worker group resumes exactly)
    again, _ = _shards(tmp_path, tiny_model_dir, a, b, wa, wb)
    assert again == shards


def test_small_data_sorted_in_the_driver_gets_the_order_of_ray_datas_sort(tmp_path, tiny_model_dir, monkeypatch):
    """Data small enough is put in its global order by the driver (no shuffle tasks to start): the shards equal
    those of Ray Data's distributed sort, weighted copies included."""
    import ray.data

    from sft_ray import data

    sorts = []  # Ray Data's sort, still called through: which way each preparation went
    real_sort = ray.data.Dataset.sort
    monkeypatch.setattr(ray.data.Dataset, "sort", lambda ds, *a, **k: sorts.append(a) or real_sort(ds, *a, **k))
    a, b = _source(tmp_path / "a.jsonl", "alpha", 300), _source(tmp_path / "b.jsonl", "beta", 200)
    driver, _ = _shards(tmp_path, tiny_model_dir, a, b, 3, 1)
    assert sorts == []  # 1,100 short rows: well under data.SORT_IN_DRIVER_BYTES
    monkeypatch.setattr(data, "SORT_IN_DRIVER_BYTES", 0)
    distributed, _ = _shards(tmp_path, tiny_model_dir, a, b, 3, 1)
    assert sorts == [("order",)]
    assert driver == distributed and sum(map(len, driver)) == 300 * 3 + 200
