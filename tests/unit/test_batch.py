"""Batch container: alignment of tensors and per-row objects through every operation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from fipo_trainer.data.batch import Batch, pad_dim1


def make_batch(n: int = 6, width: int = 3) -> Batch:
    return Batch(
        tensors={
            "x": torch.arange(n * width).reshape(n, width),
            "y": torch.arange(n, dtype=torch.float32),
        },
        non_tensors={
            "uid": [f"u{i // 2}" for i in range(n)],
            "extra_info": [{"i": i, "tags": [i, i + 1]} for i in range(n)],
        },
        meta={"step": 3},
    )


def test_construction_keeps_nested_objects_as_rows():
    b = make_batch()
    assert len(b) == 6 and b.batch_size == 6
    assert b.non_tensors["extra_info"].shape == (6,)
    assert b["extra_info"][2] == {"i": 2, "tags": [2, 3]}
    # a list of equal-length lists must stay 1-D (numpy would make it 2-D by default)
    b2 = Batch(non_tensors={"msgs": [[{"role": "user"}], [{"role": "user"}]]})
    assert b2["msgs"].shape == (2,) and b2["msgs"][0] == [{"role": "user"}]


def test_mismatched_lengths_raise_with_field_names():
    with pytest.raises(ValueError, match=r"x=4.*uid=3"):
        Batch({"x": torch.zeros(4, 2)}, {"uid": ["a", "b", "c"]})
    b = make_batch()
    with pytest.raises(ValueError, match="'z' has 5 rows but the batch has 6"):
        b["z"] = torch.zeros(5)
    with pytest.raises(ValueError, match="scalar"):
        Batch({"s": torch.tensor(1.0)})
    with pytest.raises(TypeError, match="one entry per row"):
        Batch(non_tensors={"s": "abc"})


def test_setitem_and_pop():
    b = make_batch()
    b["z"] = torch.ones(6, 2)
    b["text"] = ["t"] * 6
    assert "z" in b and "text" in b
    b["x"] = ["now", "an", "object", "field", "!", "?"]  # replacing a field may change its kind
    assert "x" in b.non_tensors and "x" not in b.tensors
    assert b.pop("z").shape == (6, 2)
    with pytest.raises(KeyError, match="no field 'nope'"):
        b.pop("nope")


@pytest.mark.parametrize(
    "idx, rows",
    [
        (2, [2]),
        (-1, [5]),
        (slice(1, 4), [1, 2, 3]),
        ([4, 0, 4], [4, 0, 4]),
        (torch.tensor([5, 1]), [5, 1]),
        (np.array([3]), [3]),
        (np.array([True, False, True, False, False, True]), [0, 2, 5]),
        (torch.tensor([False] * 6), []),
    ],
)
def test_indexing_keeps_rows_aligned(idx, rows):
    b = make_batch()
    sub = b[idx]
    assert len(sub) == len(rows)
    assert sub["y"].tolist() == [float(r) for r in rows]
    assert [e["i"] for e in sub["extra_info"]] == rows
    assert list(sub["uid"]) == [f"u{r // 2}" for r in rows]
    assert sub.meta == {"step": 3}


def test_bad_indices():
    b = make_batch()
    with pytest.raises(IndexError):
        b[6]
    with pytest.raises(IndexError):
        b[[0, 9]]
    with pytest.raises(ValueError, match="mask has length 2"):
        b[np.array([True, False])]
    with pytest.raises(TypeError):
        b[np.array([0.5])]
    with pytest.raises(KeyError, match="fields"):
        b["missing"]


def test_select_and_union():
    b = make_batch()
    s = b.select("x", "uid")
    assert sorted(s.keys()) == ["uid", "x"] and len(s) == 6
    with pytest.raises(KeyError, match="cannot select"):
        b.select("nope")
    extra = Batch({"adv": torch.ones(6, 3)}, {"uid": b["uid"]}, {"lr": 0.1})
    u = s.union(extra)
    assert sorted(u.keys()) == ["adv", "uid", "x"]
    assert u.meta == {"step": 3, "lr": 0.1}
    assert "adv" not in s  # union does not mutate
    with pytest.raises(ValueError, match="6 and 2 rows"):
        b.union(Batch({"a": torch.zeros(2)}))
    with pytest.raises(ValueError, match="'uid' differs"):
        b.union(Batch(non_tensors={"uid": ["other"] * 6}))
    with pytest.raises(ValueError, match="'y' differs"):
        b.union(Batch({"y": torch.zeros(6)}))


def test_chunk_split_concat_roundtrip():
    b = make_batch(7)
    parts = b.chunk(3)
    assert [len(p) for p in parts] == [3, 2, 2]
    back = Batch.concat(parts)
    assert torch.equal(back["x"], b["x"]) and list(back["uid"]) == list(b["uid"])
    assert [len(p) for p in b.split(3)] == [3, 3, 1]
    with pytest.raises(ValueError, match="equal parts"):
        b.chunk(2, even=True)
    with pytest.raises(ValueError, match="non-empty"):
        b.chunk(8)
    with pytest.raises(ValueError):
        b.split(0)


def test_concat_checks_fields_and_pads_on_request():
    a = Batch({"responses": torch.ones(2, 3, dtype=torch.long)}, {"uid": ["a", "b"]})
    c = Batch({"responses": torch.full((1, 5), 2, dtype=torch.long)}, {"uid": ["c"]})
    with pytest.raises(ValueError, match="different trailing shapes"):
        Batch.concat([a, c])
    joined = Batch.concat([a, c], pad={"responses": (0, "right")})
    assert joined["responses"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [2] * 5]
    left = pad_dim1(torch.ones(1, 2), 4, 9.0, "left")
    assert left.tolist() == [[9.0, 9.0, 1.0, 1.0]]
    with pytest.raises(ValueError, match="fields"):
        Batch.concat([a, Batch({"responses": torch.ones(1, 3)})])
    with pytest.raises(ValueError, match="at least one"):
        Batch.concat([])


def test_repeat_interleave_and_group_indices():
    prompts = Batch({"p": torch.tensor([[1, 2], [3, 4]])}, {"uid": ["a", "b"]})
    rep = prompts.repeat_interleave(3)
    assert rep["p"][:, 0].tolist() == [1, 1, 1, 3, 3, 3]
    assert list(rep["uid"]) == ["a", "a", "a", "b", "b", "b"]
    assert rep.group_indices() == {"a": [0, 1, 2], "b": [3, 4, 5]}
    shuffled = rep[[5, 0, 3, 1]]
    assert shuffled.group_indices("uid") == {"b": [0, 2], "a": [1, 3]}
    with pytest.raises(ValueError):
        prompts.repeat_interleave(0)


def test_pickle_and_to_device():
    b = make_batch()
    back = pickle.loads(pickle.dumps(b))
    assert torch.equal(back["x"], b["x"]) and back["extra_info"][1] == b["extra_info"][1]
    assert back.meta == b.meta
    moved = b.to("cpu")
    assert moved["x"].device.type == "cpu" and torch.equal(moved["x"], b["x"])
    assert "Batch(n=6" in repr(b)
    assert [len(r) for r in b] == [1] * 6


def test_empty_batch():
    e = Batch()
    assert len(e) == 0 and e.keys() == []
    b = make_batch()[[]]
    assert len(b) == 0 and b["x"].shape == (0, 3)


def test_merge_adds_fields_and_refuses_to_overwrite():
    b = Batch({"x": torch.arange(3)}, {"uid": ["a", "b", "c"]})
    b |= Batch({"y": torch.ones(3)}, {"acc": [True, False, True]})
    assert sorted(b.keys()) == ["acc", "uid", "x", "y"]
    with pytest.raises(ValueError, match=r"fields \['x'\] already exist"):
        b |= Batch({"x": torch.zeros(3)})
    with pytest.raises(ValueError, match="2 rows into one of 3"):
        b.update(Batch({"z": torch.zeros(2)}))
    b.update(Batch({"x": torch.zeros(3)}), overwrite=True)
    assert b["x"].tolist() == [0, 0, 0]
    c = b | Batch({"w": torch.ones(3)})
    assert "w" in c and "w" not in b
    assert set(b.select("x", "acc").keys()) == {"x", "acc"}
