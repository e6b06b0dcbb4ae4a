"""``python -m xjax``: the same command line as the ``xjax`` script."""

from xjax.cli import main

raise SystemExit(main())
