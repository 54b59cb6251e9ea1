"""Tasks: how rows become features, features become batches, batches become a loss, and a model is scored.

The trainer knows nothing about text, tags or images; it asks its task for these five things:
`prepare(table, source)` -> features, `lengths(features)`, `collate(features)` -> batch,
`loss(model, batch)` -> StepOutput, and `evaluate(model, features, batch_size)` -> metrics.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.train import metrics as M
from deltatune.train.data import (
    DataError,
    LabelMap,
    conversation,
    pad_batch,
    render_prompt,
    tokenize_instruction,
)
from deltatune.train.losses import causal_lm_loss

TASKS = ("seq-cls", "token-cls", "causal-lm", "seq2seq", "image-cls", "custom")


@dataclass
class StepOutput:
    loss: torch.Tensor
    logits: torch.Tensor | None = None
    distill_labels: torch.Tensor | None = None  # aligned with logits' leading dims; -100 = leave out
    tokens: int = 0  # tokens (or examples) processed, for throughput


def logits_of(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def real_token_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token logits without the soft prompt's positions: prompt tuning and P-tuning return logits for their
    virtual tokens too (in front, as peft does), which no label belongs to."""
    if labels.dim() == 2 and logits.dim() == 3 and logits.shape[1] > labels.shape[1]:
        return logits[:, -labels.shape[1] :]
    return logits


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch minus the fields only the loss needs."""
    return {k: v for k, v in batch.items() if k not in ("labels", "label_ids")}


def _batches(items: Sequence[Any], size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class Task:
    """Shared defaults: token features padded per batch, loss is the cross-entropy on `labels`."""

    name = "task"
    metric = "eval_loss"  # the default metric for early stopping / best checkpoint
    greater_is_better = False

    def __init__(self, tokenizer: Any = None, max_length: int = 256) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def lengths(self, features: Sequence[dict[str, Any]]) -> list[int]:
        return [len(f["input_ids"]) if "input_ids" in f else 1 for f in features]

    def collate(self, features: Sequence[Any]) -> Any:
        pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0
        return pad_batch(list(features), pad_id)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        labels = batch["labels"]
        logits = real_token_logits(logits_of(model(**model_inputs(batch))), labels)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100
        )
        tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else labels.shape[0]
        return StepOutput(loss, logits, labels if labels.dim() == logits.dim() - 1 else None, tokens)

    @torch.no_grad()
    def eval_loss(self, model: nn.Module, features: Sequence[Any], batch_size: int) -> float:
        device, total, count = _device_of(model), 0.0, 0
        for chunk in _batches(features, batch_size):
            out = self.loss(model, to_device(self.collate(chunk), device))
            total += float(out.loss) * len(chunk)
            count += len(chunk)
        return total / max(1, count)

    def evaluate(self, model: nn.Module, features: Sequence[Any], batch_size: int) -> dict[str, Any]:
        return {"eval_loss": self.eval_loss(model, features, batch_size)}

    def describe(self) -> dict[str, Any]:
        """What `eval` and `predict` need to rebuild this task (kept in the run's saved config)."""
        return {"task": self.name}


# --- classification of whole sequences ----------------------------------------------------------
class SequenceClassificationTask(Task):
    """One text (or a pair) -> one label, e.g. sentiment (SST-2) or entailment (pairs)."""

    name = "seq-cls"
    metric = "accuracy"
    greater_is_better = True

    def __init__(
        self,
        tokenizer: Any,
        text_column: str = "text",
        label_column: str = "label",
        text_pair_column: str | None = None,
        labels: LabelMap | None = None,
        max_length: int = 256,
    ) -> None:
        super().__init__(tokenizer, max_length)
        self.text_column, self.text_pair_column, self.label_column = (
            text_column,
            text_pair_column,
            label_column,
        )
        self.labels = labels

    def fit_labels(self, table) -> LabelMap:
        if self.labels is None:
            self.labels = LabelMap.from_values(table[self.label_column])
        return self.labels

    def encode_texts(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[dict[str, Any]]:
        enc = self.tokenizer(
            list(texts),
            list(pairs) if pairs is not None else None,
            truncation=True,
            max_length=self.max_length,
        )
        return [{k: enc[k][i] for k in enc.keys()} for i in range(len(texts))]

    def prepare(self, table, source: str = "the data") -> list[dict[str, Any]]:
        texts = [str(t) if t is not None else "" for t in table[self.text_column]]
        pairs = [str(t) for t in table[self.text_pair_column]] if self.text_pair_column else None
        features = self.encode_texts(texts, pairs)
        if self.label_column in table.column_names:
            labels = self.fit_labels(table)
            for f, value in zip(features, table[self.label_column]):
                f["labels"] = labels.encode(value, source)
        return features

    @torch.no_grad()
    def scores(self, model: nn.Module, features: Sequence[dict[str, Any]], batch_size: int) -> torch.Tensor:
        device, out = _device_of(model), []
        for chunk in _batches(features, batch_size):
            batch = to_device(
                self.collate([{k: v for k, v in f.items() if k != "labels"} for f in chunk]), device
            )
            out.append(logits_of(model(**batch)).float().softmax(-1).cpu())
        return torch.cat(out)

    def evaluate(
        self, model: nn.Module, features: Sequence[dict[str, Any]], batch_size: int
    ) -> dict[str, Any]:
        probs = self.scores(model, features, batch_size)
        refs = [f["labels"] for f in features]
        result = M.classification_scores(probs.argmax(-1).tolist(), refs, self.labels.names)
        result["eval_loss"] = float(F.nll_loss(probs.clamp_min(1e-12).log(), torch.tensor(refs)))
        return result

    def predict(
        self, model: nn.Module, rows: Sequence[dict[str, Any]], batch_size: int = 32
    ) -> list[dict[str, Any]]:
        texts = [str(r[self.text_column]) for r in rows]
        pairs = [str(r[self.text_pair_column]) for r in rows] if self.text_pair_column else None
        probs = self.scores(model, self.encode_texts(texts, pairs), batch_size)
        names = self.labels.names
        return [
            {
                "label": names[int(p.argmax())],
                "score": float(p.max()),
                "scores": {n: float(v) for n, v in zip(names, p)},
            }
            for p in probs
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "text_column": self.text_column,
            "text_pair_column": self.text_pair_column,
            "label_column": self.label_column,
            "labels": self.labels.names if self.labels else None,
        }


# --- token classification (BIO tags) ------------------------------------------------------------
class TokenClassificationTask(Task):
    """A list of words -> one tag per word (BIO). Only each word's first sub-token carries the label."""

    name = "token-cls"
    metric = "entity_f1"
    greater_is_better = True

    def __init__(
        self,
        tokenizer: Any,
        text_column: str = "tokens",
        label_column: str = "tags",
        labels: LabelMap | None = None,
        max_length: int = 256,
    ) -> None:
        super().__init__(tokenizer, max_length)
        self.text_column, self.label_column, self.labels = text_column, label_column, labels

    def prepare(self, table, source: str = "the data") -> list[dict[str, Any]]:
        words = list(table[self.text_column])  # datasets returns a lazy Column; token-cls indexes it
        if words and not isinstance(words[0], list):
            raise DataError(f"{source}: column {self.text_column!r} must hold lists of words for token-cls.")
        tags = list(table[self.label_column]) if self.label_column in table.column_names else None
        if tags is not None and self.labels is None:
            self.labels = LabelMap.from_values([t for row in tags for t in row])
        enc = self.tokenizer(
            list(words), is_split_into_words=True, truncation=True, max_length=self.max_length
        )
        features = []
        for i in range(len(words)):
            f = {k: enc[k][i] for k in enc.keys()}
            word_ids = enc.word_ids(i)
            f["word_ids"] = [-1 if w is None else w for w in word_ids]
            if tags is not None:
                if len(tags[i]) != len(words[i]):
                    raise DataError(f"{source}: row {i} has {len(words[i])} words but {len(tags[i])} tags.")
                previous, labels = None, []
                for w in word_ids:
                    labels.append(
                        -100 if w is None or w == previous else self.labels.encode(tags[i][w], source)
                    )
                    previous = w
                f["labels"] = labels
            features.append(f)
        return features

    def collate(self, features):
        batch = super().collate([{k: v for k, v in f.items() if k != "word_ids"} for f in features])
        return batch

    def evaluate(self, model: nn.Module, features, batch_size: int) -> dict[str, Any]:
        device, preds, refs, total = _device_of(model), [], [], 0.0
        with torch.no_grad():
            for chunk in _batches(features, batch_size):
                batch = to_device(self.collate(chunk), device)
                out = self.loss(model, batch)
                total += float(out.loss) * len(chunk)
                guess = out.logits.argmax(-1).cpu()
                for row, f in zip(guess, chunk):
                    keep = [j for j, label in enumerate(f["labels"]) if label != -100]
                    preds.append([self.labels.names[int(row[j])] for j in keep])
                    refs.append([self.labels.names[f["labels"][j]] for j in keep])
        result = M.entity_scores(preds, refs)
        result["eval_loss"] = total / max(1, len(features))
        return result

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "text_column": self.text_column,
            "label_column": self.label_column,
            "labels": self.labels.names if self.labels else None,
        }


# --- causal LM instruction tuning ---------------------------------------------------------------
class CausalLMTask(Task):
    """Instruction tuning: Alpaca rows or chat `messages`; the loss is on the assistant's tokens only.
    Evaluation adds greedy generations scored by exact match, BLEU and chrF."""

    name = "causal-lm"
    metric = "eval_loss"

    def __init__(
        self, tokenizer: Any, max_length: int = 512, max_new_tokens: int = 64, generate_samples: int = 32
    ) -> None:
        super().__init__(tokenizer, max_length)
        self.max_new_tokens, self.generate_samples = max_new_tokens, generate_samples

    def prepare(self, table, source: str = "the data") -> list[dict[str, Any]]:
        features = []
        for row in table:
            f = tokenize_instruction(self.tokenizer, row, self.max_length)
            if all(label == -100 for label in f["labels"]):
                continue  # the response was truncated away; nothing to learn from this row
            messages = conversation(row)
            f["prompt"], f["reference"] = (
                render_prompt(self.tokenizer, messages[:-1]),
                messages[-1]["content"],
            )
            features.append(f)
        if not features:
            raise DataError(
                f"{source}: no row has a response left after truncation to {self.max_length} tokens."
            )
        return features

    def collate(self, features):
        return super().collate([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])

    # Score only the response tokens without building full logits (losses.py); off when logits are needed
    # (distillation compares them with a teacher's).
    fused_loss = True

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        tokens = int(batch["attention_mask"].sum())
        if self.fused_loss:
            fused = causal_lm_loss(model, batch)
            if fused is not None:
                return StepOutput(fused, None, None, tokens)
        logits = logits_of(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
        logits = real_token_logits(logits, batch["labels"])
        shifted = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], 1)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1), ignore_index=-100
        )
        return StepOutput(loss, logits, shifted, tokens)

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: Sequence[str], batch_size: int = 8) -> list[str]:
        """Greedy continuations of already-rendered prompts (left padding, so every row ends where it starts)."""
        tok, device, out = self.tokenizer, _device_of(model), []
        side, tok.padding_side = tok.padding_side, "left"
        try:
            for chunk in _batches(list(prompts), batch_size):
                enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                ids = model.generate(
                    **enc, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
                )
                out += tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        finally:
            tok.padding_side = side
        return [text.strip() for text in out]

    def evaluate(self, model: nn.Module, features, batch_size: int) -> dict[str, Any]:
        result = {"eval_loss": self.eval_loss(model, features, batch_size)}
        sample = list(features)[: self.generate_samples]
        if sample:
            generations = self.generate(model, [f["prompt"] for f in sample], batch_size)
            result.update(M.generation_scores(generations, [f["reference"] for f in sample]))
        return result

    def predict(
        self, model: nn.Module, rows: Sequence[dict[str, Any]], batch_size: int = 8
    ) -> list[dict[str, Any]]:
        prompts = []
        for row in rows:
            if "messages" in row or "instruction" in row:
                messages = conversation({**row, "output": row.get("output", "")})
                messages = messages[:-1] if messages[-1]["role"] == "assistant" else messages
            else:
                messages = [{"role": "user", "content": str(row.get("text", row.get("prompt", "")))}]
            prompts.append(render_prompt(self.tokenizer, messages))
        return [{"generation": g} for g in self.generate(model, prompts, batch_size)]

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "max_new_tokens": self.max_new_tokens}


# --- seq2seq ------------------------------------------------------------------------------------
class Seq2SeqTask(CausalLMTask):
    """Encoder-decoder models (T5, BART): source text in, target text out."""

    name = "seq2seq"

    def __init__(
        self,
        tokenizer: Any,
        text_column: str = "source",
        label_column: str = "target",
        max_length: int = 256,
        max_new_tokens: int = 64,
        generate_samples: int = 32,
    ) -> None:
        super().__init__(tokenizer, max_length, max_new_tokens, generate_samples)
        self.text_column, self.label_column = text_column, label_column

    def prepare(self, table, source: str = "the data") -> list[dict[str, Any]]:
        sources, targets = (
            [str(s) for s in table[self.text_column]],
            [str(t) for t in table[self.label_column]],
        )
        enc = self.tokenizer(sources, text_target=targets, truncation=True, max_length=self.max_length)
        return [
            {
                "input_ids": enc["input_ids"][i],
                "labels": enc["labels"][i],
                "prompt": sources[i],
                "reference": targets[i],
            }
            for i in range(len(sources))
        ]

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        logits = logits_of(
            model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            )
        )
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1), ignore_index=-100
        )
        return StepOutput(loss, logits, batch["labels"], int(batch["attention_mask"].sum()))

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: Sequence[str], batch_size: int = 8) -> list[str]:
        device, out = _device_of(model), []
        for chunk in _batches(list(prompts), batch_size):
            enc = self.tokenizer(
                chunk, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length
            ).to(device)
            ids = model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False)
            out += self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [text.strip() for text in out]

    def predict(
        self, model: nn.Module, rows: Sequence[dict[str, Any]], batch_size: int = 8
    ) -> list[dict[str, Any]]:
        return [
            {"generation": g}
            for g in self.generate(model, [str(r[self.text_column]) for r in rows], batch_size)
        ]

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "text_column": self.text_column, "label_column": self.label_column}


# --- images -------------------------------------------------------------------------------------
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def image_folder(root: str) -> list[tuple[str, str]]:
    """(path, class name) for every image under root/<class name>/."""
    if not os.path.isdir(root):
        raise DataError(f"Image folder not found: {root}.")
    rows = [
        (os.path.join(root, cls, name), cls)
        for cls in sorted(os.listdir(root))
        if os.path.isdir(os.path.join(root, cls))
        for name in sorted(os.listdir(os.path.join(root, cls)))
        if name.lower().endswith(IMAGE_EXTENSIONS)
    ]
    if not rows:
        raise DataError(f"{root} holds no images in class sub-folders (expected root/<class>/<image>.png).")
    return rows


class ImageClassificationTask(Task):
    """Images -> one label. Features come from a tensor dataset ((image tensor, label) pairs) or an image folder
    (root/<class>/*.png); an image processor, when given, turns PIL images into `pixel_values`."""

    name = "image-cls"
    metric = "accuracy"
    greater_is_better = True

    def __init__(self, processor: Any = None, labels: LabelMap | None = None, image_size: int = 32) -> None:
        super().__init__(None)
        self.processor, self.labels, self.image_size = processor, labels, image_size

    def _pixels(self, path: str) -> torch.Tensor:
        from PIL import Image

        image = Image.open(path).convert("RGB")
        if self.processor is not None:
            return self.processor(image, return_tensors="pt")["pixel_values"][0]
        image = image.resize((self.image_size, self.image_size))
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return data.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float() / 255.0

    def prepare(self, data, source: str = "the data") -> list[dict[str, Any]]:
        if isinstance(data, str):
            rows = image_folder(data)
            if self.labels is None:
                self.labels = LabelMap.from_values([cls for _, cls in rows])
            return [
                {"pixel_values": self._pixels(p), "labels": self.labels.encode(c, source)} for p, c in rows
            ]
        pairs = [(x, int(y)) for x, y in data]
        if self.labels is None:
            self.labels = LabelMap.from_values([y for _, y in pairs])
        return [{"pixel_values": x, "labels": self.labels.encode(y, source)} for x, y in pairs]

    def lengths(self, features) -> list[int]:
        return [1] * len(features)

    def collate(self, features):
        return {
            "pixel_values": torch.stack([f["pixel_values"] for f in features]),
            "labels": torch.tensor([f["labels"] for f in features]),
        }

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        pixels = batch["pixel_values"]
        logits = logits_of(model(pixel_values=pixels) if hasattr(model, "config") else model(pixels))
        return StepOutput(
            F.cross_entropy(logits.float(), batch["labels"]), logits, batch["labels"], len(pixels)
        )

    def evaluate(self, model: nn.Module, features, batch_size: int) -> dict[str, Any]:
        device, preds, total = _device_of(model), [], 0.0
        with torch.no_grad():
            for chunk in _batches(features, batch_size):
                out = self.loss(model, to_device(self.collate(chunk), device))
                total += float(out.loss) * len(chunk)
                preds += out.logits.argmax(-1).tolist()
        result = M.classification_scores(preds, [f["labels"] for f in features], self.labels.names)
        result["eval_loss"] = total / max(1, len(features))
        return result

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "labels": self.labels.names if self.labels else None}


# --- anything else ------------------------------------------------------------------------------
class CustomTask(Task):
    """Any nn.Module with a user loss: `loss_fn(model, batch)` returns the loss (or (loss, logits)).

    Features are whatever the user's dataset yields; `collate_fn` defaults to torch's default_collate and
    `metrics_fn(model, features)` may add scores to the evaluation loss."""

    name = "custom"

    def __init__(
        self, loss_fn: Callable, collate_fn: Callable | None = None, metrics_fn: Callable | None = None
    ) -> None:
        super().__init__(None)
        from torch.utils.data import default_collate

        self.loss_fn, self.collate_fn, self.metrics_fn = loss_fn, collate_fn or default_collate, metrics_fn

    def prepare(self, data, source: str = "the data") -> list[Any]:
        return list(data)

    def lengths(self, features) -> list[int]:
        return [1] * len(features)

    def collate(self, features):
        return self.collate_fn(list(features))

    def loss(self, model: nn.Module, batch: Any) -> StepOutput:
        out = self.loss_fn(model, batch)
        loss, logits = out if isinstance(out, tuple) else (out, None)
        size = len(batch[0]) if isinstance(batch, (list, tuple)) else 1
        return StepOutput(loss, logits, None, size)

    def evaluate(self, model: nn.Module, features, batch_size: int) -> dict[str, Any]:
        result = {"eval_loss": self.eval_loss(model, features, batch_size)}
        if self.metrics_fn is not None:
            result.update(self.metrics_fn(model, features))
        return result
