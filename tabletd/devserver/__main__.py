"""REFERENCE SERVER — development and tests only, never installed on a tablet.

``python -m tabletd.devserver``, the same as ``tabletd-devserver``.
"""

import sys

from tabletd.devserver.cli import main

sys.exit(main())
