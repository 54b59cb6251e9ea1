"""Applications on top of the library: the command line, the server, the studio, the benchmark and the demo.

Nothing below this package (the core, `deltatune.train`) imports from it; the import contracts in pyproject.toml
check that on every `make test`.
"""
