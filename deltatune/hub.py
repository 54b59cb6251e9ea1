"""Where adapter files come from (a local folder, or a hub repository when the machine is online) and what goes
to the hub with them: the model card and the upload.

Only safetensors and JSON are ever read from what this returns (see deltatune.checkpoint).
"""

from __future__ import annotations

import os

from huggingface_hub import HfApi, ModelCard, hf_hub_download


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


# --- the model card and uploads --------------------------------------------------------------------------------
CARD_NAME = "README.md"

_CARD_BODY = """
# {title}

A {method} adapter for `{base}`, written by deltatune in peft's format (`adapter_config.json` +
`adapter_model.safetensors`): it loads in deltatune and in peft alike.

```python
import deltatune as peft  # or: import peft
model = peft.{auto_class}.from_pretrained("{location}")
```

### Framework versions
"""


def write_model_card(
    directory: str,
    *,
    base_model: str | None,
    method: str,
    library_name: str,
    tags: list[str],
    pipeline_tag: str | None,
    auto_class: str,
    version_line: str,
    location: str,
) -> None:
    """Create `README.md` (a short card: what the adapter is, how to load it) or update an existing one (e.g. the
    card transformers' Trainer writes): its metadata gets the library, the base model and the tags the Hub uses to
    list the folder as an adapter of that base, and the framework versions list gets `version_line`. `location` is
    the folder or repository the card's loading snippet names."""
    path = os.path.join(directory, CARD_NAME)
    if os.path.isfile(path):
        card = ModelCard.load(path)
    else:
        body = _CARD_BODY.format(
            title=os.path.basename(os.path.abspath(directory)),
            method=method,
            base=base_model or "its base model",
            auto_class=auto_class,
            location=location,
        )
        card = ModelCard(f"---\nlibrary_name: {library_name}\n---\n{body}")
    card.data.library_name = library_name
    if base_model:
        card.data.base_model = base_model
    card.data.tags = sorted(set(card.data.tags or []) | set(tags)) or None
    if pipeline_tag and not card.data.pipeline_tag:
        card.data.pipeline_tag = pipeline_tag
    lines = card.text.rstrip("\n").splitlines()
    if version_line not in lines:
        if "### Framework versions" not in lines:
            lines += ["", "### Framework versions"]
        lines.append(version_line)
    card.text = "\n".join(lines) + "\n"
    card.save(path)


def upload_folder(
    folder: str,
    repo_id: str,
    *,
    commit_message: str,
    commit_description: str | None,
    private: bool | None,
    token: str | bool | None,
    revision: str | None,
    create_pr: bool,
):
    """Create the hub repository if needed and upload `folder` (only what it holds) as one commit."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message,
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )
