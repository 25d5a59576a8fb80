"""Evaluation: the run over a dataset (:mod:`.run`), exact metrics in torch (:mod:`.metrics`), the
HTML report (:mod:`.report`), plots and overlays (:mod:`.viz`) and the speed benchmark
(:mod:`.speed`). No argparse here: ``clipad eval`` and ``clipad bench`` live in :mod:`clipad.cli`.

Import the module you need (``from clipad.eval import metrics``); ``clipad.metrics`` still works.
"""
