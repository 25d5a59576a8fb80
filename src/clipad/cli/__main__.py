"""``python -m clipad.cli``: the same as ``clipad``."""

import sys

from . import main

sys.exit(main())
