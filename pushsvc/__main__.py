"""``python -m pushsvc``: same as the ``pushsvc`` console script."""

from .cli import main

raise SystemExit(main())
