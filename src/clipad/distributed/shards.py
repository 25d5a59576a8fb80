"""Shard files: deterministic names, atomic writes, reading them back, and the merge that keeps
every image exactly once.

A shard is what one actor batch produced: ``shards/<name>.parquet`` (one row per scored image)
and, optionally, ``maps/<name>.npz``. Parquet because Ray Data depends on pyarrow, so it is
always present where shards are written; nothing here imports ray. The maps are written first
and the table last, each through a temporary file renamed into place, so a table that exists
belongs to a complete shard: the tables are the manifest of finished images.

:func:`merge_rows` is the one place where shard rows become "each image once": rows of one image
that agree (a retried or padded batch) collapse to one; rows that disagree, rows of images the
run did not ask for, and images neither scored nor reported as failed raise
:class:`~clipad.errors.ClipadError`, because a metric computed on such a union would be wrong
without anyone noticing (a sampler that pads the last shard would count images twice).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ClipadError
from ..eval.files import atomic_write

SHARDS_DIR = "shards"
MAPS_DIR = "maps"

#: the stem of every shard file :func:`shard_name` makes
SHARD_FILE = re.compile(r"\d{9,}-\d{5,}-[0-9a-f]{10}")

#: at most this many ids are quoted in a merge error
_QUOTED = 3


def shard_name(indices: Iterable[int]) -> str:
    """Deterministic name of the shard holding the inputs ``indices``: the same batch (a retry
    after an actor died) gets the same name and overwrites its file; another batch never does."""
    idx = sorted(int(i) for i in indices)
    if not idx:
        raise ClipadError("a shard needs at least one input index")
    digest = hashlib.blake2b(",".join(map(str, idx)).encode(), digest_size=5).hexdigest()
    return f"{idx[0]:09d}-{len(idx):05d}-{digest}"


def write_shard(out_dir: str | os.PathLike, name: str, table: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> Path:
    """Write ``maps/<name>.npz`` (if ``arrays``), then ``shards/<name>.parquet``; each atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    if arrays is not None:
        with atomic_write(out / MAPS_DIR / f"{name}.npz", "wb") as f:
            np.savez(f, **arrays)
    path = out / SHARDS_DIR / f"{name}.parquet"
    with atomic_write(path, "wb") as f:
        pq.write_table(pa.table(table), f)
    return path


def shard_paths(out_dir: str | os.PathLike) -> list[Path]:
    """The complete shards' tables in ``out_dir`` (temporary files of unfinished writes excluded)."""
    d = Path(out_dir) / SHARDS_DIR
    return sorted(d.glob("*.parquet")) if d.is_dir() else []


def read_shards(out_dir: str | os.PathLike, columns: Sequence[str] | None = None) -> list[tuple[str, list[dict[str, Any]]]]:
    """[(shard name, its rows as dicts)] of every complete shard in ``out_dir``, in name order."""
    import pyarrow.parquet as pq

    out = []
    for p in shard_paths(out_dir):
        table = pq.read_table(p, columns=list(columns) if columns else None)
        out.append((p.stem, table.to_pylist()))
    return out


def done_ids(out_dir: str | os.PathLike) -> set[str]:
    """Ids of the images that complete shards in ``out_dir`` hold (what a resumed run skips)."""
    return {row["id"] for _, rows in read_shards(out_dir, columns=["id"]) for row in rows}


@dataclass
class Merged:
    """The union of shard rows, each image once.

    Attributes:
        rows: id -> (shard name, row), in the order the ids were first met.
        duplicates: rows dropped because an identical row of the same image came first.
    """

    rows: dict[str, tuple[str, dict[str, Any]]]
    duplicates: int


def _quoted(ids: Iterable[str]) -> str:
    ids = sorted(ids)
    more = f" and {len(ids) - _QUOTED} more" if len(ids) > _QUOTED else ""
    return ", ".join(f"'{i}'" for i in ids[:_QUOTED]) + more


def merge_rows(
    shards: Iterable[tuple[str, Sequence[dict[str, Any]]]],
    expected: Iterable[str] | None = None,
    failed: Iterable[str] = (),
    compare: Sequence[str] = ("score",),
) -> Merged:
    """Merge shard rows (each a dict with an ``id``) into each image once.

    Args:
        shards: [(shard name, rows)], e.g. :func:`read_shards`.
        expected: the ids the run was asked to score; None skips the completeness checks.
        failed: ids reported as failed (unreadable): allowed to be missing.
        compare: columns two rows of one image must agree on to count as one (exactly: the same
            batch scored twice gives the same numbers; a retry on other hardware that does not
            is a conflict to look at, not to average away).

    Raises:
        ClipadError: two rows of one image disagree; a row of an image not in ``expected``; an
            expected image neither in a shard nor in ``failed``.
    """
    rows: dict[str, tuple[str, dict[str, Any]]] = {}
    duplicates = 0
    for name, shard_rows in shards:
        for row in shard_rows:
            key = row["id"]
            if key not in rows:
                rows[key] = (name, row)
                continue
            first_name, first = rows[key]
            for col in compare:
                a, b = first.get(col), row.get(col)
                if not (a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)):
                    raise ClipadError(
                        f"image '{key}' has two different {col}s, {a!r} in shard '{first_name}' and {b!r} in shard "
                        f"'{name}': the output folder mixes runs that disagree; delete its shards/ and run again"
                    )
            duplicates += 1
    if expected is not None:
        expected = set(expected)
        unknown = set(rows) - expected
        if unknown:
            raise ClipadError(
                f"{len(unknown)} scored image(s) are not inputs of this run ({_quoted(unknown)}): the output folder "
                "holds shards of another run; use another output folder or run without resume"
            )
        missing = expected - set(rows) - set(failed)
        if missing:
            raise ClipadError(
                f"{len(missing)} input image(s) are in no shard and were not reported as failed ({_quoted(missing)}): "
                "shards were lost; run again with resume to score them"
            )
    return Merged(rows, duplicates)
