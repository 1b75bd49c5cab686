"""`python -m kllama ...` (and `torchrun -m kllama ...`): the same entry point as the `kllama` console script."""
from kllama.cli import main

raise SystemExit(main())
