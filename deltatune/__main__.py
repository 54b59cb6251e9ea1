"""`python -m deltatune ...` (and `torchrun -m deltatune train ...`) run the command-line interface."""

from deltatune.apps.cli import main

main()
