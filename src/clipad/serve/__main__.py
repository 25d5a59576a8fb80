"""``python -m clipad.serve ...``: the same as ``clipad serve ...`` (an entry point, above every layer)."""

import sys

from ..cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
