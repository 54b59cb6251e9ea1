"""The studio's one folder: every file it reads or writes lies under the workspace, after resolving `..` and
symlinks. Runs are its sub-folders (one per run, the run's `output_dir`), uploads go to `data/`, merged models to
`exports/`. A model is a packaged alias, a hub name, or a folder / `.gguf` file inside the workspace."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator

from deltatune.errors import ConfigError
from deltatune.models import PACKAGED
from deltatune.train.data import FORMATS
from deltatune.train.recipe import RUN_CONFIG, resolve_path

DATA_DIR = "data"
EXPORTS_DIR = "exports"
STATE_FILE = "studio.json"  # the studio's record of a run (pid, starts, stop requests)
RECIPE_FILE = "recipe.yaml"  # the recipe the run was started from (what `deltatune train` reads)
RESERVED = {DATA_DIR, EXPORTS_DIR}
# Run names become folder names and adapter names inside one model (no dots: module names cannot hold them).
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class OutsideWorkspace(ConfigError):
    """A path that resolves outside the workspace (answered with 403)."""


class UploadTooLarge(ConfigError):
    """An upload over the size limit (answered with 413)."""


def is_run_folder(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in (STATE_FILE, RUN_CONFIG, RECIPE_FILE))


class Workspace:
    def __init__(self, root: str, max_upload_bytes: int = 200 * 2**20) -> None:
        os.makedirs(root, exist_ok=True)
        self.root = os.path.realpath(root)
        self.max_upload_bytes = max_upload_bytes

    # --- paths ---------------------------------------------------------------------------------------
    def resolve(self, path: str, must_exist: bool = True, what: str = "path") -> str:
        """The real absolute path of `path` (relative paths are taken from the workspace), refused unless it lies
        inside the workspace."""
        if not isinstance(path, str) or not path or "\x00" in path:
            raise ConfigError(f"The {what} is empty or not a valid path.")
        real = os.path.realpath(os.path.join(self.root, os.path.expanduser(path)))
        if os.path.commonpath([real, self.root]) != self.root:
            raise OutsideWorkspace(
                f"{path} is outside the studio's workspace {self.root}; copy it into the workspace (or upload "
                "it) and pick it from there."
            )
        if must_exist and not os.path.exists(real):
            raise ConfigError(f"No such {what} in the workspace: {path}.")
        return real

    def relative(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def run_folder(self, name: str, must_exist: bool = True) -> str:
        if not isinstance(name, str) or not RUN_NAME.match(name) or name in RESERVED:
            raise ConfigError(
                f"Bad run name {name!r}: use 1-64 letters, digits, '_' or '-' (not {' or '.join(sorted(RESERVED))})."
            )
        folder = os.path.join(self.root, name)
        if must_exist and not (os.path.isdir(folder) and is_run_folder(folder)):
            raise FileNotFoundError(f"No run named {name!r} in the workspace.")
        return folder

    def model_ref(self, value: str) -> str:
        """What a recipe may name as its model (or teacher): a packaged alias or a hub name as given, a folder or
        `.gguf` file in the workspace as its absolute path. A name that would be found as a folder outside the
        workspace (recipes look in the recipe's folder and its parents) is refused."""
        value = (value or "").strip()
        if not value:
            raise ConfigError(
                "Choose a base model: a packaged alias, a folder or .gguf file in the workspace, or a hub name."
            )
        if value.lower() in PACKAGED:
            return value
        inside = os.path.join(self.root, value)
        pathlike = os.path.isabs(value) or value.startswith((".", "~")) or value.endswith(".gguf")
        if pathlike or os.path.exists(inside):
            real = self.resolve(value, what="model")
            if os.path.isdir(real) and not os.path.isfile(os.path.join(real, "config.json")):
                raise ConfigError(f"{value} is a folder without config.json; it is not a transformers model.")
            return real
        if not HUB_NAME.match(value) or ".." in value:
            raise ConfigError(
                f"Model {value!r} is not a packaged alias ({', '.join(PACKAGED)}), a folder or .gguf file in the "
                "workspace, or a hub name like org/name."
            )
        found = resolve_path(value, self.root)
        if found != value and os.path.commonpath([os.path.realpath(found), self.root]) != self.root:
            raise OutsideWorkspace(f"{value} names a folder outside the workspace ({found}); use a hub name.")
        return value

    # --- listings --------------------------------------------------------------------------------------
    def _walk(self, max_depth: int = 3):
        """(folder, sub-folders, files) under the root, skipping run folders (their files are the run's own)."""
        for folder, dirs, files in os.walk(self.root):
            depth = self.relative(folder).count(os.sep) + (folder != self.root)
            model = "config.json" in files  # a model folder: its JSON files are not data
            dirs[:] = sorted(
                d
                for d in dirs
                if not d.startswith(".")
                and depth < max_depth
                and not model
                and not is_run_folder(os.path.join(folder, d))
                and not os.path.islink(os.path.join(folder, d))
            )
            yield folder, dirs, [] if model else sorted(files)

    def data_files(self) -> list[dict[str, object]]:
        """Files `deltatune train` can read (CSV/TSV/JSON/JSONL/Parquet), outside run folders."""
        out = []
        for folder, _, files in self._walk():
            for name in files:
                if os.path.splitext(name)[1].lower() in FORMATS:
                    path = os.path.join(folder, name)
                    out.append({"path": self.relative(path), "bytes": os.path.getsize(path)})
        return out

    def model_paths(self) -> list[str]:
        """Model folders (with config.json) and .gguf files in the workspace, merged exports included."""
        out = []
        for folder, _, files in self._walk():
            out += [self.relative(os.path.join(folder, f)) for f in files if f.endswith(".gguf")]
            if folder != self.root and os.path.isfile(os.path.join(folder, "config.json")):
                out.append(self.relative(folder))
        return sorted(out)

    def run_names(self) -> list[str]:
        return sorted(
            name
            for name in os.listdir(self.root)
            if RUN_NAME.match(name) and name not in RESERVED and is_run_folder(os.path.join(self.root, name))
        )

    # --- uploads -------------------------------------------------------------------------------------
    async def save_upload(self, filename: str, chunks: AsyncIterator[bytes], declared: int | None) -> str:
        """Stream an upload to data/<filename>, refusing unknown types, existing names and bodies over the limit
        (checked against the declared length first, then byte by byte; a refused upload leaves no file)."""
        name = filename or ""
        ext = os.path.splitext(name)[1].lower()
        if not FILE_NAME.match(name) or ext not in FORMATS:
            raise ConfigError(
                f"Bad file name {filename!r}: use letters, digits, '.', '_' or '-', ending in one of "
                f"{', '.join(FORMATS)}."
            )
        limit = self.max_upload_bytes
        if declared is not None and declared > limit:
            raise UploadTooLarge(f"The file is {declared:,} bytes; the upload limit is {limit:,} bytes.")
        folder = os.path.join(self.root, DATA_DIR)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        if os.path.exists(path):
            raise ConfigError(
                f"{DATA_DIR}/{name} already exists in the workspace; rename the file or pick it."
            )
        size = 0
        try:
            with open(path + ".part", "wb") as fh:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise UploadTooLarge(f"The file is over the upload limit of {limit:,} bytes.")
                    fh.write(chunk)
            os.replace(path + ".part", path)
        finally:
            if os.path.exists(path + ".part"):
                os.remove(path + ".part")
        return self.relative(path)
