"""Instruction tuning of decoder LMs: the loss is on the response tokens only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.train import metrics as M
from deltatune.train.data import DataError, LabelMap, conversation, render_prompt, tokenize_instruction
from deltatune.train.losses import causal_lm_loss
from deltatune.train.packing import attention_inputs, pack
from deltatune.train.tasks.base import (
    StepOutput,
    Task,
    _batches,
    _device_of,
    logits_of,
    real_token_logits,
)


class CausalLMTask(Task):
    """Instruction tuning: Alpaca rows or chat `messages`; the loss is on the assistant's tokens only.
    Evaluation adds greedy generations scored by exact match, BLEU and chrF. With `packing`, the rows of a batch
    are put end to end in one sequence without padding (deltatune/train/packing.py)."""

    name = "causal-lm"
    metric = "eval_loss"
    task_type = "CAUSAL_LM"

    @classmethod
    def from_run(cls, run: Any, tokenizer: Any, labels: LabelMap | None) -> CausalLMTask:
        return cls(tokenizer, run.max_length, run.max_new_tokens, run.generate_samples, run.packing)

    def __init__(
        self,
        tokenizer: Any,
        max_length: int = 512,
        max_new_tokens: int = 64,
        generate_samples: int = 32,
        packing: bool = False,
    ) -> None:
        super().__init__(tokenizer, max_length)
        self.max_new_tokens, self.generate_samples = max_new_tokens, generate_samples
        self.packing = packing

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
        rows = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
        return pack(rows) if self.packing else super().collate(rows)

    # Score only the response tokens without building full logits (losses.py); off when logits are needed
    # (distillation compares them with a teacher's).
    fused_loss = True

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        if "position_ids" in batch:  # packed: one row, no padding
            batch = {**batch, **attention_inputs(model, batch["position_ids"])}
            tokens = batch["input_ids"].numel()
        else:
            tokens = int(batch["attention_mask"].sum())
        if self.fused_loss:
            fused = causal_lm_loss(model, batch)
            if fused is not None:
                return StepOutput(fused, None, None, tokens)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        logits = logits_of(model(**inputs))
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
