"""Text-to-image: LoRA on a diffusion pipeline's UNet, trained with the standard noise-prediction loss.

From a recipe, `model` is a diffusers pipeline folder (Stable Diffusion layout: unet/, vae/, text_encoder/,
tokenizer/, scheduler/). Data: rows of `image` (path or base64) and `text` (the caption). Only the UNet is
adapted (LoRA on the attention projections to_q, to_k, to_v, to_out.0 by default, as diffusers' own LoRA
training scripts do); the autoencoder and text encoder are frozen, so each image's latent and each caption's
embedding are computed once. The loss: noise the latent at a uniformly drawn timestep with the pipeline's
scheduler and regress the scheduler's target (the noise, or v) with MSE.

A run saves, beside the usual adapter files, `pytorch_lora_weights.safetensors`, which diffusers'
`pipeline.load_lora_weights(run_dir)` loads unchanged. `predict` writes images (seeded: the same seed gives the
same image here and in diffusers with the same LoRA).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deltatune.train import images as I
from deltatune.train.data import DataError, LabelMap
from deltatune.train.tasks.base import StepOutput, Task, _batches, _device_of, evaluating, to_device

ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]


class TextToImageTask(Task):
    """Captioned images -> a UNet LoRA. `pipeline` is the diffusers pipeline whose `unet` is (or will be) adapted."""

    name = "text-to-image"
    metric = "eval_loss"
    default_columns = ("text", None)

    @classmethod
    def from_run(cls, run: Any, pipeline: Any, labels: LabelMap | None) -> TextToImageTask:
        return cls(pipeline, run.image_size, run.image_column or "image", run.text_column, run.num_inference_steps,
                   data_dir=I.data_dir(run.train_file))  # fmt: skip

    @classmethod
    def row_columns(cls, run: Any) -> tuple[list[str], str | None]:
        return [run.image_column or "image", run.text_column], None  # a row is its image and caption

    @classmethod
    def build_model(cls, run: Any, labels: LabelMap | None) -> tuple[nn.Module, Any]:
        from deltatune.integrations.diffusers import load_pipeline

        pipeline = load_pipeline(run.model)
        return pipeline.unet, pipeline

    def default_targets(self, model: nn.Module) -> list[str]:
        return list(ATTENTION_PROJECTIONS)

    def __init__(
        self,
        pipeline: Any,
        image_size: int | None = None,
        image_column: str = "image",
        text_column: str = "text",
        num_inference_steps: int = 20,
        read_files: bool = True,
        data_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(pipeline.tokenizer)
        self.pipeline = pipeline
        self.image_size = image_size or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
        self.image_column, self.text_column = image_column, text_column
        self.num_inference_steps, self.read_files, self.data_dir, self.seed = (
            num_inference_steps, read_files, data_dir, seed
        )  # fmt: skip
        pipeline.set_progress_bar_config(disable=True)

    # --- data: latents and caption embeddings, computed once --------------------------------------
    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(texts), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        )  # fmt: skip
        encoder = self.pipeline.text_encoder
        return encoder(tokens.input_ids.to(encoder.device))[0].cpu()

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> scaled latents (the mean of the autoencoder's posterior)."""
        vae = self.pipeline.vae
        latents = vae.encode((pixels * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mean
        return (latents * vae.config.scaling_factor).float().cpu()

    def prepare(self, table, source: str = "the data") -> list[dict[str, Any]]:
        for column in (self.image_column, self.text_column):
            if column not in table.column_names:
                raise DataError(f"{source} has no {column!r} column (columns: {table.column_names}).")
        if len(table) == 0:
            return []
        folder = I.data_dir(source, self.data_dir)
        texts = [str(t) for t in table[self.text_column]]
        pixels = [
            I.to_tensor(I.open_image(v, folder, self.read_files), self.image_size).float() / 255
            for v in table[self.image_column]
        ]
        embeddings = dict(zip(sorted(set(texts)), self.embed_text(sorted(set(texts)))))
        latents = torch.cat([self.encode_images(torch.stack(chunk)) for chunk in _batches(pixels, 32)])
        return [{"latents": z, "text": embeddings[t]} for z, t in zip(latents, texts)]

    def lengths(self, features) -> list[int]:
        return [1] * len(features)

    def collate(self, features):
        return {
            "latents": torch.stack([f["latents"] for f in features]),
            "text": torch.stack([f["text"] for f in features]),
        }

    # --- the noise-prediction loss --------------------------------------------------------------
    def diffusion_loss(
        self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator | None = None
    ):
        latents, scheduler = batch["latents"], self.pipeline.scheduler
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        steps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        steps = steps.to(latents.device)
        noisy = scheduler.add_noise(latents, noise, steps)
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = scheduler.get_velocity(latents, noise, steps)
        else:
            raise DataError(
                f"Training for prediction_type={kind!r} is not supported; use epsilon or v_prediction."
            )
        prediction = model(noisy, steps, encoder_hidden_states=batch["text"]).sample
        return F.mse_loss(prediction.float(), target.float())

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        return StepOutput(self.diffusion_loss(model, batch), None, None, len(batch["latents"]))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, features, batch_size: int) -> dict[str, Any]:
        """The loss on fixed noise and timesteps (seeded per batch), so evaluations compare across steps."""
        device, total = _device_of(model), 0.0
        with evaluating(model):
            for i, chunk in enumerate(_batches(features, batch_size)):
                generator = torch.Generator().manual_seed(self.seed * 7919 + i)
                batch = to_device(self.collate(chunk), device)
                total += float(self.diffusion_loss(model, batch, generator)) * len(chunk)
        return {"eval_loss": total / max(1, len(features))}

    # --- images -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, prompts: Sequence[str], seed: int, steps: int | None = None, guidance_scale: float = 1.0
    ):
        """PIL images from the pipeline (its UNet carries the adapter), one generator seeded with `seed`."""
        generator = torch.Generator().manual_seed(int(seed))
        with evaluating(self.pipeline.unet):
            return self.pipeline(
                list(prompts), generator=generator, num_inference_steps=steps or self.num_inference_steps,
                guidance_scale=guidance_scale, height=self.image_size, width=self.image_size,
            ).images  # fmt: skip

    def predict(
        self, model: nn.Module, rows: Sequence[dict[str, Any]], batch_size: int = 8
    ) -> list[dict[str, Any]]:
        """Per row (`text` or `prompt`, optional `seed` (default 0), `num_inference_steps`, `guidance_scale`,
        `output` path for the PNG and `return_image` for it as base64): one image."""
        if self.pipeline.unet is not _unwrapped(model):
            raise DataError("This model is not the pipeline's UNet; build the task from the same pipeline.")
        results = []
        for row in rows:
            prompt = row.get("prompt", row.get(self.text_column))
            if not isinstance(prompt, str):
                raise DataError(
                    f"Each row needs a prompt ('prompt' or {self.text_column!r}); got {sorted(row)}."
                )
            image = self.generate(
                [prompt],
                row.get("seed", 0),
                row.get("num_inference_steps"),
                float(row.get("guidance_scale", 1.0)),
            )[0]
            result: dict[str, Any] = {"prompt": prompt, "seed": int(row.get("seed", 0))}
            if row.get("output"):
                result["output"] = I.save_image(image, row["output"])
            if row.get("return_image") or not row.get("output"):
                result["image_png_base64"] = I.png_base64(image)
            result["mean_pixel"] = round(float(np.asarray(image).mean()) / 255, 4)
            results.append(result)
        return results

    def on_save(self, model: nn.Module, output_dir: str) -> None:
        """Write the LoRA in diffusers' file too (pytorch_lora_weights.safetensors)."""
        from deltatune.integrations.diffusers import save_diffusers_lora

        save_diffusers_lora(model, output_dir)

    def describe(self) -> dict[str, Any]:
        return {"task": self.name}


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model
