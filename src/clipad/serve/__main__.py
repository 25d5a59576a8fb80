"""``python -m clipad.serve ...``: the same as ``clipad serve ...`` (an entry point, above every layer)."""

import sys

from ..cli.serve import main

sys.exit(main())
