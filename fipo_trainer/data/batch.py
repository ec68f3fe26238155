"""The batch container that flows between trainer, rollout, actor and reward stages.

Why not a plain dict: every stage slices, splits, repeats and regroups rows, and tensors and
per-sample Python objects (uids, ground truths, texts) must stay aligned while doing so.
One class that checks lengths on every operation turns silent misalignment into a clear
error. It holds only plain attributes so it pickles through Ray as-is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

Index = int | slice | Sequence[int] | torch.Tensor | np.ndarray


def to_object_array(values: Any, name: str = "value") -> np.ndarray:
    """1-D ``dtype=object`` array with one entry per row (lists/dicts stay whole entries)."""
    if isinstance(values, np.ndarray) and values.dtype == object and values.ndim == 1:
        return values
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(
            f"non-tensor field {name!r} must be a sequence with one entry per row, got {type(values).__name__}"
        )
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def pad_dim1(t: torch.Tensor, length: int, value: float, side: str) -> torch.Tensor:
    """Pad dim 1 of ``t`` to ``length`` on the ``left`` or ``right``."""
    extra = length - t.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad a tensor of width {t.shape[1]} down to {length}")
    if extra == 0:
        return t
    if side not in ("left", "right"):
        raise ValueError(f"pad side must be 'left' or 'right', got {side!r}")
    filler = torch.full((t.shape[0], extra, *t.shape[2:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([filler, t] if side == "left" else [t, filler], dim=1)


class Batch:
    """Tensors (same leading dim N) + per-row object arrays (length N) + free-form ``meta``."""

    __slots__ = ("meta", "non_tensors", "tensors")

    def __init__(
        self,
        tensors: dict[str, torch.Tensor] | None = None,
        non_tensors: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.tensors: dict[str, torch.Tensor] = dict(tensors or {})
        self.non_tensors: dict[str, np.ndarray] = {
            k: to_object_array(v, k) for k, v in (non_tensors or {}).items()
        }
        self.meta: dict[str, Any] = dict(meta or {})
        self._check()

    # ----------------------------------------------------------------- basics
    def _check(self) -> None:
        sizes = {}
        for k, t in self.tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"tensor field {k!r} must be a torch.Tensor, got {type(t).__name__}"
                )
            if t.ndim == 0:
                raise ValueError(f"tensor field {k!r} is a scalar; put scalars in meta")
            sizes[k] = t.shape[0]
        for k, v in self.non_tensors.items():
            sizes[k] = len(v)
        if len(set(sizes.values())) > 1:
            detail = ", ".join(f"{k}={n}" for k, n in sizes.items())
            raise ValueError(f"Batch fields have different lengths: {detail}")
        overlap = self.tensors.keys() & self.non_tensors.keys()
        if overlap:
            raise ValueError(f"keys {sorted(overlap)} are both tensor and non-tensor fields")

    def __len__(self) -> int:
        for t in self.tensors.values():
            return t.shape[0]
        for v in self.non_tensors.values():
            return len(v)
        return 0

    @property
    def batch_size(self) -> int:
        return len(self)

    def keys(self) -> list[str]:
        return [*self.tensors, *self.non_tensors]

    def __contains__(self, key: object) -> bool:
        return key in self.tensors or key in self.non_tensors

    def __setitem__(self, key: str, value: Any) -> None:
        """Add or replace one field (tensor or per-row sequence); lengths are checked."""
        if isinstance(value, torch.Tensor):
            if value.ndim == 0:
                raise ValueError(f"tensor field {key!r} is a scalar; put scalars in meta")
            new_n = value.shape[0]
        else:
            value = to_object_array(value, key)
            new_n = len(value)
        n = next((t.shape[0] for k, t in self.tensors.items() if k != key), None)
        if n is None:
            n = next((len(v) for k, v in self.non_tensors.items() if k != key), None)
        if n is not None and new_n != n:
            raise ValueError(f"field {key!r} has {new_n} rows but the batch has {n}")
        self.tensors.pop(key, None)
        self.non_tensors.pop(key, None)
        if isinstance(value, torch.Tensor):
            self.tensors[key] = value
        else:
            self.non_tensors[key] = value

    def pop(self, key: str) -> Any:
        if key in self.tensors:
            return self.tensors.pop(key)
        if key in self.non_tensors:
            return self.non_tensors.pop(key)
        raise KeyError(self._missing(key))

    def _missing(self, key: str) -> str:
        return f"Batch has no field {key!r}; fields: {self.keys()}"

    def __getitem__(self, idx: str | Index) -> Any:
        """``batch["key"]`` gives the field; any other index gives a row-subset ``Batch``."""
        if isinstance(idx, str):
            if idx in self.tensors:
                return self.tensors[idx]
            if idx in self.non_tensors:
                return self.non_tensors[idx]
            raise KeyError(self._missing(idx))
        rows = self._normalise_index(idx)
        if isinstance(rows, slice):
            return Batch(
                {k: t[rows] for k, t in self.tensors.items()},
                {k: v[rows] for k, v in self.non_tensors.items()},
                self.meta,
            )
        t_rows = torch.as_tensor(rows, dtype=torch.long)
        return Batch(
            {k: t.index_select(0, t_rows.to(t.device)) for k, t in self.tensors.items()},
            {k: v[rows] for k, v in self.non_tensors.items()},
            self.meta,
        )

    def _normalise_index(self, idx: Index) -> slice | np.ndarray:
        n = len(self)
        if isinstance(idx, (bool, np.bool_)):
            raise TypeError("a single bool is not a valid Batch index")
        if isinstance(idx, (int, np.integer)):
            i = int(idx)
            if not -n <= i < n:
                raise IndexError(f"row {i} out of range for a Batch of {n} rows")
            i %= n
            return slice(i, i + 1)
        if isinstance(idx, slice):
            return idx
        arr = idx.cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
        if arr.ndim != 1:
            raise ValueError(f"Batch index must be 1-D, got shape {arr.shape}")
        if arr.dtype == bool:
            if len(arr) != n:
                raise ValueError(f"boolean mask has length {len(arr)} but the batch has {n} rows")
            return np.flatnonzero(arr)
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"Batch index must be integers or booleans, got dtype {arr.dtype}")
        if arr.min() < -n or arr.max() >= n:
            raise IndexError(
                f"index out of range for a Batch of {n} rows: {arr.min()}..{arr.max()}"
            )
        return arr.astype(np.int64) % max(n, 1)

    def __iter__(self) -> Iterator[Batch]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        t = ", ".join(f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in self.tensors.items())
        nt = ", ".join(self.non_tensors)
        return (
            f"Batch(n={len(self)}, tensors={{{t}}}, non_tensors=[{nt}], meta={sorted(self.meta)})"
        )

    def __getstate__(self) -> dict[str, Any]:
        return {"tensors": self.tensors, "non_tensors": self.non_tensors, "meta": self.meta}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.tensors = state["tensors"]
        self.non_tensors = state["non_tensors"]
        self.meta = state["meta"]

    # ------------------------------------------------------------ combinators
    def select(self, *keys: str, meta: bool = True) -> Batch:
        """Only the given fields (same rows)."""
        missing = [k for k in keys if k not in self]
        if missing:
            raise KeyError(f"cannot select {missing}: Batch fields are {self.keys()}")
        return Batch(
            {k: self.tensors[k] for k in keys if k in self.tensors},
            {k: self.non_tensors[k] for k in keys if k in self.non_tensors},
            self.meta if meta else None,
        )

    def union(self, other: Batch) -> Batch:
        """A new Batch with the fields of both; shared fields must hold equal values."""
        if len(self.keys()) and len(other.keys()) and len(self) != len(other):
            raise ValueError(f"cannot union Batches of {len(self)} and {len(other)} rows")
        tensors = dict(self.tensors)
        for k, t in other.tensors.items():
            if k in tensors and not (
                tensors[k].shape == t.shape and torch.equal(tensors[k], t.to(tensors[k].device))
            ):
                raise ValueError(f"union: tensor field {k!r} differs between the two Batches")
            tensors[k] = t
        non_tensors = dict(self.non_tensors)
        for k, v in other.non_tensors.items():
            if k in non_tensors and not _objects_equal(non_tensors[k], v):
                raise ValueError(f"union: non-tensor field {k!r} differs between the two Batches")
            non_tensors[k] = v
        return Batch(tensors, non_tensors, {**self.meta, **other.meta})

    def update(self, other: Batch, *, overwrite: bool = False) -> Batch:
        """Add ``other``'s fields (same rows) in place; returns self.

        A stage returns only the fields it adds, so by default a field that already exists
        is an error (``overwrite=True`` replaces it). ``other.meta`` is merged too.
        """
        if not isinstance(other, Batch):
            raise TypeError(f"can only merge a Batch into a Batch, got {type(other).__name__}")
        if len(self.keys()) and len(other.keys()) and len(self) != len(other):
            raise ValueError(f"cannot merge a Batch of {len(other)} rows into one of {len(self)}")
        clash = sorted(set(self.keys()) & set(other.keys()))
        if clash and not overwrite:
            raise ValueError(
                f"merge: fields {clash} already exist; a stage must return only the fields "
                "it adds (see data/schema.py)"
            )
        for k in clash:
            self.pop(k)
        self.tensors.update(other.tensors)
        self.non_tensors.update(other.non_tensors)
        self.meta.update(other.meta)
        return self

    def __ior__(self, other: Batch) -> Batch:
        return self.update(other)

    def __or__(self, other: Batch) -> Batch:
        return Batch(self.tensors, self.non_tensors, self.meta).update(other)

    def chunk(self, k: int, *, even: bool = False) -> list[Batch]:
        """``k`` consecutive parts whose sizes differ by at most one (``even=True``: equal sizes)."""
        n = len(self)
        if k < 1:
            raise ValueError(f"chunk count must be >= 1, got {k}")
        if k > n:
            raise ValueError(f"cannot chunk a Batch of {n} rows into {k} non-empty parts")
        if even and n % k:
            raise ValueError(
                f"cannot chunk a Batch of {n} rows into {k} equal parts; pad or resize the batch"
            )
        base, rest = divmod(n, k)
        out, start = [], 0
        for i in range(k):
            size = base + (i < rest)
            out.append(self[start : start + size])
            start += size
        return out

    def split(self, size: int) -> list[Batch]:
        """Consecutive parts of ``size`` rows (the last may be shorter)."""
        if size < 1:
            raise ValueError(f"split size must be >= 1, got {size}")
        return [self[i : i + size] for i in range(0, len(self), size)]

    @staticmethod
    def concat(
        batches: Iterable[Batch], *, pad: dict[str, tuple[float, str]] | None = None
    ) -> Batch:
        """Stack rows of Batches with the same fields.

        ``pad`` maps a tensor key to ``(value, "left"|"right")`` so that e.g. responses of
        different widths from several rollout workers can be joined.
        """
        batches = list(batches)
        if not batches:
            raise ValueError("Batch.concat needs at least one Batch")
        keys = set(batches[0].keys())
        for i, b in enumerate(batches[1:], start=1):
            if set(b.keys()) != keys:
                raise ValueError(
                    f"Batch.concat: batch {i} has fields {sorted(b.keys())}, batch 0 has {sorted(keys)}"
                )
        pad = pad or {}
        tensors = {}
        for k in batches[0].tensors:
            parts = [b.tensors[k] for b in batches]
            if k in pad and parts[0].ndim >= 2:
                width = max(p.shape[1] for p in parts)
                value, side = pad[k]
                parts = [pad_dim1(p, width, value, side) for p in parts]
            shapes = {tuple(p.shape[1:]) for p in parts}
            if len(shapes) > 1:
                raise ValueError(
                    f"Batch.concat: tensor {k!r} has different trailing shapes {sorted(shapes)}; "
                    f"pass pad={{{k!r}: (value, 'left'|'right')}}"
                )
            tensors[k] = torch.cat(parts, dim=0)
        non_tensors = {
            k: np.concatenate([b.non_tensors[k] for b in batches]) for k in batches[0].non_tensors
        }
        meta: dict[str, Any] = {}
        for b in batches:
            meta.update(b.meta)
        return Batch(tensors, non_tensors, meta)

    def repeat_interleave(self, n: int) -> Batch:
        """Each row repeated ``n`` times consecutively (prompt -> n responses)."""
        if n < 1:
            raise ValueError(f"repeat count must be >= 1, got {n}")
        return Batch(
            {k: t.repeat_interleave(n, dim=0) for k, t in self.tensors.items()},
            {k: np.repeat(v, n) for k, v in self.non_tensors.items()},
            self.meta,
        )

    def group_indices(self, key: str = "uid") -> dict[Any, list[int]]:
        """Row indices per distinct value of ``key``, in order of first appearance."""
        values = self[key]
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        groups: dict[Any, list[int]] = {}
        for i, v in enumerate(values):
            groups.setdefault(v, []).append(i)
        return groups

    def to(self, device: str | torch.device, *, non_blocking: bool = False) -> Batch:
        """A Batch whose tensors live on ``device`` (keep CPU when passing through Ray)."""
        return Batch(
            {k: t.to(device, non_blocking=non_blocking) for k, t in self.tensors.items()},
            self.non_tensors,
            self.meta,
        )


def _objects_equal(a: np.ndarray, b: np.ndarray) -> bool:
    if len(a) != len(b):
        return False
    return all(_value_equal(x, y) for x, y in zip(a, b))


def _value_equal(x: Any, y: Any) -> bool:
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return bool(np.array_equal(x, y))
    try:
        return bool(x == y)
    except (TypeError, ValueError):
        return x is y
