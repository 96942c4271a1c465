"""``python -m kvwire.bench``: the same as the ``kvwire-bench`` console script."""

from . import main

raise SystemExit(main())
