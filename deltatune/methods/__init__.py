"""The methods, one file (or folder) each. What a method must provide is `deltatune.method.Method`; the list of
methods is `deltatune.registry.METHODS`. Adding a method = one file here + one line there."""
