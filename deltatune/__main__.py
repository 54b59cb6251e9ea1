"""`python -m deltatune ...` (and `torchrun -m deltatune train ...`) run the command-line interface."""

from deltatune.cli import main

main()
