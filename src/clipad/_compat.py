"""Old module paths keep working: ``import clipad.metrics`` gives :mod:`clipad.eval.metrics`.

Up to clipad 0.1 these modules sat at the top of the package; 0.2 moved them into folders per concern.
An import of an old name is answered with the module at its new place (the same object, so
monkeypatching and ``isinstance`` behave as before); nothing is copied.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

#: old module name -> new module name
MOVED = {
    "clipad.backbone": "clipad.backbones.clip",
    "clipad.weights": "clipad.backbones.weights",
    "clipad.blocks": "clipad.backbones.blocks",
    "clipad.dualpath": "clipad.backbones.dualpath",
    "clipad.precision": "clipad.backbones.precision",
    "clipad.text": "clipad.components.prompts",
    "clipad.prompt_learning": "clipad.components.prompt_learning",
    "clipad.losses": "clipad.components.losses",
    "clipad.smoothing": "clipad.components.smoothing",
    "clipad.prompts_anoclip": "clipad.methods.anoclip.prompts",
    "clipad.ot": "clipad.methods.tokenclip.ot",
    "clipad.imageio": "clipad.data.images",
    "clipad.preprocess": "clipad.data.transforms",
    "clipad.metrics": "clipad.eval.metrics",
    "clipad.report": "clipad.eval.report",
    "clipad.viz": "clipad.eval.viz",
    "clipad.evaluate": "clipad.eval.run",
    "clipad.bench": "clipad.eval.speed",
    "clipad.serve.command": "clipad.cli.serve",
}


class _AliasLoader(importlib.abc.Loader):
    def create_module(self, spec):  # a throwaway module; exec_module swaps in the real one
        return None

    def exec_module(self, module) -> None:
        # The import system returns whatever sys.modules holds under the name after exec_module.
        sys.modules[module.__name__] = importlib.import_module(MOVED[module.__name__])


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.machinery.ModuleSpec(fullname, _AliasLoader())
        return None


def install() -> None:
    """Answer old module names (idempotent)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
