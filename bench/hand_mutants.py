"""Mutants mutmut cannot make: it skips every decorated function, and `AdapterLayer.merge`, `unmerge` and
`check_merge` (all `@torch.no_grad()`) hold the merge bookkeeping, including the issue's example
(`merged_adapters.pop()` -> `pop(0)`). Each mutant here is one textual edit of a copy of the package; the focused
tests run against that copy and must fail. Run by `make mutation`; results in docs/mutation.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_core_mutations.py", "tests/test_merge_exact.py"]

# (file, the exact text, its mutation); each text occurs once in its file.
# Equivalent (not counted): `if count <= 0` -> `if count < 0` makes `unmerge(0)` restore the originals and redo the
# same merges, which gives the same bits (a merge is deterministic); it is only slower.
EQUIVALENT = {"if count < 0:"}
MUTANTS = [
    ("deltatune/layer.py", "self.merged_adapters.pop())", "self.merged_adapters.pop(0))"),
    ("deltatune/layer.py", "for _ in range(count):", "for _ in range(count - 1):"),
    (
        "deltatune/layer.py",
        "        if count <= 0:\n            return",
        "        if count < 0:\n            return",
    ),
    ("deltatune/layer.py", "stay = self.merged_adapters[: len(self.merged_adapters) - count]", "stay = []"),
    (
        "deltatune/layer.py",
        "        if not stay:\n            self._original = None",
        "        if stay:\n            self._original = None",
    ),
    (
        "deltatune/layer.py",
        "        for name in stay:\n            self._merge_one(name)",
        "        for name in stay[1:]:\n            self._merge_one(name)",
    ),
    ("deltatune/layer.py", "if keep_original and not self.merged_adapters:", "if keep_original:"),
    ("deltatune/layer.py", "if keep_original and not self.merged_adapters:", "if not self.merged_adapters:"),
    ("deltatune/layer.py", "self.unmerge(len(self.merged_adapters) - done)", "self.unmerge()"),
    (
        "deltatune/layer.py",
        "        if not safe_merge:\n            return",
        "        if safe_merge:\n            return",
    ),
    ("deltatune/layer.py", "if not torch.isfinite(weight).all():", "if not torch.isfinite(weight).any():"),
    (
        "deltatune/layer.py",
        "        if not names:\n            return",
        "        if names:\n            return",
    ),
    (
        "deltatune/layer.py",
        "        if not self.mergeable:\n            raise",
        "        if self.mergeable:\n            raise",
    ),
]


def run_one(file: str, text: str, mutation: str, workdir: Path) -> bool:
    """True if the focused tests fail (the mutant is killed)."""
    target = workdir / file
    source = (ROOT / file).read_text()
    assert source.count(text) == 1, f"{file}: {text!r} must occur exactly once"
    target.write_text(source.replace(text, mutation))
    try:
        env = {**os.environ, "PYTHONPATH": str(workdir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-x",
            "-q",
            "-p",
            "no:cacheprovider",
            *TESTS,
            "-m",
            "not slow",
        ]
        result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
        return result.returncode != 0
    finally:
        target.write_text(source)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for item in ("deltatune", "tests", "pyproject.toml"):
            copy = shutil.copytree if (ROOT / item).is_dir() else shutil.copy
            copy(ROOT / item, workdir / item)
        killed = 0
        for file, text, mutation in MUTANTS:
            if any(e in mutation for e in EQUIVALENT):
                print(f"equivalent {file}: {mutation.strip().splitlines()[0]!r} (see EQUIVALENT)", flush=True)
                continue
            dead = run_one(file, text, mutation, workdir)
            killed += dead
            first = lambda s: s.strip().splitlines()[0]  # noqa: E731
            print(
                f"{'killed ' if dead else 'SURVIVED'} {file}: {first(text)!r} -> {first(mutation)!r}",
                flush=True,
            )
        counted = len(MUTANTS) - sum(any(e in m for e in EQUIVALENT) for _, _, m in MUTANTS)
        print(f"hand mutants: {killed}/{counted} killed ({len(MUTANTS) - counted} equivalent, not counted)")


if __name__ == "__main__":
    main()
