"""``python -m tabletd`` runs the command line."""

from tabletd.cli import main

raise SystemExit(main())
