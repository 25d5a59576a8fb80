"""``clipad serve``: an HTTP inspection service around one detector (needs ``clipad[serve]``).

The pieces: :mod:`.app` (ASGI app factory :func:`create_app`), :mod:`.batcher` (dynamic
batching on one model thread), :mod:`.images` (upload decoding, PNG answers),
:mod:`.references` (k-shot references kept per class, optionally on disk), :mod:`.command`
(the ``clipad serve`` subcommand), ``page.html`` (the page at ``/``).

Only :mod:`.command` is imported here, so that ``clipad --help`` works without FastAPI.
"""

from .command import add_serve_parser, cmd_serve

__all__ = ["add_serve_parser", "cmd_serve"]
