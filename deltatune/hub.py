"""Where adapter files come from: a local folder, or a hub repository when the machine is online.

Only safetensors and JSON are ever read from what this returns (see deltatune.checkpoint).
"""

from __future__ import annotations

import os

from huggingface_hub import hf_hub_download


def resolve_adapter_file(path: str | os.PathLike, filename: str, revision: str | None = None) -> str:
    """A file of an adapter folder: local first, else fetched from the hub (only when online)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        candidate = os.path.join(path, filename)
        if not os.path.isfile(candidate):
            present = ", ".join(sorted(os.listdir(path))) or "nothing"
            raise FileNotFoundError(
                f"{path} has no {filename} (it holds: {present}); is it an adapter folder?"
            )
        return candidate
    if os.path.exists(path):
        raise FileNotFoundError(f"{path} is a file; pass the adapter folder that holds {filename}.")
    looks_like_repo = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise FileNotFoundError(f"No adapter folder at {path!r}.")
    try:
        return hf_hub_download(path, filename, revision=revision)
    except Exception as err:  # offline, missing repo, missing file: one clear message
        raise FileNotFoundError(
            f"No adapter folder at {path!r}, and fetching {filename} from the hub failed ({type(err).__name__}: {err})."
        ) from err
