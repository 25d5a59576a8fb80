"""Module paths of clipad 0.1 keep working after the move into folders (clipad._compat)."""

from __future__ import annotations

import importlib

import pytest

import clipad
from clipad._compat import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_path_is_the_new_module(old):
    new = importlib.import_module(MOVED[old])
    assert importlib.import_module(old) is new
    parent, _, name = old.rpartition(".")
    assert getattr(importlib.import_module(parent), name) is new


def test_names_users_imported_from_old_paths():
    from clipad.backbone import create_backbone
    from clipad.imageio import list_images, load_image
    from clipad.metrics import compute
    from clipad.ot import sinkhorn
    from clipad.smoothing import gaussian_blur

    from clipad.backbones.clip import create_backbone as new_create
    from clipad.eval.metrics import compute as new_compute

    assert create_backbone is new_create and compute is new_compute
    assert callable(list_images) and callable(load_image) and callable(sinkhorn) and callable(gaussian_blur)
    # the methods' old modules are packages now; their names are still reachable there
    from clipad.methods.anoclip import AnoCLIP, tile_offsets
    from clipad.methods.anomalyclip import AnomalyCLIP

    assert AnoCLIP.name == "anoclip" and AnomalyCLIP.name == "anomalyclip" and callable(tile_offsets)
    from clipad import train as training

    assert callable(training.fit) and callable(training.official_mask)


def test_unknown_old_path_still_fails():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("clipad.no_such_module")
    assert not hasattr(clipad, "no_such_module")
