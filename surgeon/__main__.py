"""``python -m surgeon``: the same as the ``surgeon`` command."""

from .cli import main

raise SystemExit(main())
