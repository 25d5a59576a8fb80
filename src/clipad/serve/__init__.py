"""``clipad serve``: an HTTP inspection service around one detector (needs ``clipad[serve]``).

The pieces: :mod:`.app` (ASGI app factory :func:`create_app`), :mod:`.batcher` (dynamic
batching on one model thread), :mod:`.budget` (decoded-pixel budgets per request and in
flight, memory given back), :mod:`.images` (upload decoding, PNG answers),
:mod:`.references` (k-shot references kept per class, optionally on disk), ``page.html`` (the
page at ``/``). The command line is :mod:`clipad.cli.serve`. Nothing is imported here, so that
importing the package needs no FastAPI.
"""
