"""``python -m dogbench`` (what ``torchrun -m dogbench`` runs): the command line."""

from dogbench.cli import main

raise SystemExit(main())
