"""``python -m dogbench.cli``: the command line (as ``python -m dogbench``)."""

from dogbench.cli import main

raise SystemExit(main())
