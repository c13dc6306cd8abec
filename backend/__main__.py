"""``python -m backend ...``: see :mod:`backend.cli`."""

from backend.cli import main

raise SystemExit(main())
