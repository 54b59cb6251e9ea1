"""deltatune's version, in one leaf module: the package, the model card and pyproject.toml agree (a test checks), and
the card reads it here rather than from installed metadata, which a checkout on PYTHONPATH does not have."""

__version__ = "0.1.0"
