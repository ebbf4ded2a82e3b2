"""`python -m trajformer` (and `torchrun -m trajformer`) runs the CLI."""

from trajformer.cli import main

main()
