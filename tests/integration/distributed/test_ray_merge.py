"""The shard merge keeps every image exactly once, and clipad.distributed stays optional.

No Ray here (these run wherever the test suite runs): the merge is plain Python over shard rows,
and the import checks block ``ray`` to see what a user without the extra gets.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from clipad.distributed.shards import merge_rows, shard_name
from clipad.errors import ClipadError
from clipad.eval import metrics


def _shards(scores: np.ndarray, labels: np.ndarray, size: int) -> list[tuple[str, list[dict]]]:
    rows = [{"id": f"img{i}", "score": float(scores[i]), "label": int(labels[i])} for i in range(len(scores))]
    return [(shard_name(range(i, min(i + size, len(rows)))), rows[i : i + size]) for i in range(0, len(rows), size)]


def _auroc(rows) -> float:
    return metrics.compute(np.array([r["score"] for r in rows]), np.array([r["label"] for r in rows]))["image_auroc"]


def test_a_padded_shard_counts_each_image_once():
    """A distributed sampler pads the last shard with repeats of real images; merged, each image
    counts once and AUROC equals the unsharded one (while the padded union's would differ)."""
    rng = np.random.default_rng(0)
    scores, labels = rng.random(10), np.array([0, 1] * 5)
    shards = _shards(scores, labels, 4)  # 4 + 4 + 2
    name, last = shards[-1]
    padded = shards[:-1] + [(name, last + [shards[0][1][0], shards[0][1][1]])]  # padded to 4 with repeats
    naive = [r for _, rows in padded for r in rows]
    assert len(naive) == 12
    merged = merge_rows(padded, expected=[f"img{i}" for i in range(10)])
    assert sorted(merged.rows) == sorted(f"img{i}" for i in range(10))
    assert merged.duplicates == 2
    exact = metrics.compute(scores, labels)["image_auroc"]
    assert _auroc([r for _, r in merged.rows.values()]) == exact
    assert _auroc(naive) != exact  # what the merge prevents: the test could fail


def test_a_retried_shard_overwrites_its_own_name():
    assert shard_name([3, 1, 2]) == shard_name([1, 2, 3])  # the same batch, retried
    assert shard_name([1, 2, 3]) != shard_name([1, 2, 4])
    assert shard_name([1, 2]) != shard_name([1, 2, 3])


def test_conflicting_unknown_and_missing_images_raise():
    rows = _shards(np.arange(4.0), np.array([0, 1, 0, 1]), 2)
    bad = rows + [("other", [{"id": "img0", "score": 9.0, "label": 0}])]
    with pytest.raises(ClipadError, match="two different scores"):
        merge_rows(bad)
    with pytest.raises(ClipadError, match="not inputs of this run"):
        merge_rows(rows, expected=["img0", "img1", "img2"])
    with pytest.raises(ClipadError, match="in no shard"):
        merge_rows(rows[:1], expected=["img0", "img1", "img2", "img3"])
    merged = merge_rows(rows[:1], expected=["img0", "img1", "img2", "img3"], failed=["img2", "img3"])
    assert sorted(merged.rows) == ["img0", "img1"]


def test_shards_round_trip(tmp_path):
    pytest.importorskip("pyarrow")
    from clipad.distributed.shards import done_ids, read_shards, write_shard

    for sub in ("shards", "maps"):
        (tmp_path / sub).mkdir()
    write_shard(tmp_path, "a", {"id": ["x", "y"], "score": np.array([1.5, 2.5], np.float32)}, {"0": np.ones((2, 3))})
    assert read_shards(tmp_path) == [("a", [{"id": "x", "score": 1.5}, {"id": "y", "score": 2.5}])]
    assert done_ids(tmp_path) == {"x", "y"}
    assert np.load(tmp_path / "maps" / "a.npz")["0"].shape == (2, 3)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["a.parquet"]  # no temporary left


def test_without_ray_import_works_and_the_call_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.delitem(sys.modules, "clipad.distributed", raising=False)
    import clipad.distributed as dist

    for call in (lambda: dist.predict([tmp_path], tmp_path / "o", backbone="tiny"),
                 lambda: dist.evaluate(None, tmp_path / "o")):
        with pytest.raises(ClipadError) as info:
            call()
        assert str(info.value).count("\n") == 0 and 'pip install "clipad[ray]"' in str(info.value)


def test_the_single_process_commands_never_import_ray():
    code = ("import sys; from clipad.cli import build_parser; build_parser(['predict', 'eval']); "
            "import clipad.distributed; assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

