"""LoRA for a diffusion model, measured: teach a small pretrained text-to-image model a class it has never seen.

1. `pretrain`: a small Stable Diffusion pipeline (deltatune.integrations.diffusers.build_pipeline) learns 9 of the
   10 Fashion-MNIST classes from captions "a photo of a <class>": first its autoencoder (reconstruction), then its
   UNet (noise prediction, in full). The held-out class ("bag") is never shown. It is saved to
   assets/diffusion/base, with the held-out class's training images and captions in assets/diffusion/bag/.
2. `deltatune train recipes/text-to-image-fashion-lora.yaml`: LoRA on the UNet's attention learns "a photo of a
   bag" from those images.
3. `score`: a Fashion-MNIST classifier (a small CNN trained here on real images, all 10 classes, scored on the
   test split) labels 64 samples of "a photo of a bag" from the base and from the adapted model (same seeds).
   It also loads the run's `pytorch_lora_weights.safetensors` into a fresh diffusers pipeline with
   `load_lora_weights` and checks that it draws the same images. Results: bench/results/text_to_image.{json,md}.

    python bench/text_to_image.py pretrain && deltatune train recipes/text-to-image-fashion-lora.yaml \
        && python bench/text_to_image.py score
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from deltatune.apps.vision_assets import FASHION_CLASSES, fashion_mnist
from deltatune.integrations import diffusers as D
from deltatune.train.tasks.text_to_image import TextToImageTask

WORDS = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
NEW_CLASS = 8  # "Bag"
ROOT = "assets/diffusion"
SIZE = 16  # Fashion-MNIST resized to 16x16: small enough to pretrain on a shared 2-core CPU


def caption(label: int) -> str:
    return f"a photo of a {WORDS[label]}"


def images_of(split: str, keep) -> tuple[torch.Tensor, np.ndarray]:
    """Fashion-MNIST as (n, 3, SIZE, SIZE) [0, 1] tensors (grey on three channels) and labels."""
    images, labels = fashion_mnist(split)
    rows = np.flatnonzero(keep(labels))
    x = torch.from_numpy(images[rows]).float().div(255)[:, None]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True).clamp(0, 1)
    return x.expand(-1, 3, -1, -1).contiguous(), labels[rows]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pretrain(args) -> None:
    torch.manual_seed(0)
    pipeline = D.build_pipeline(f"{ROOT}/base", WORDS, image_size=SIZE, width=16)
    x, y = images_of("train", lambda labels: labels != NEW_CLASS)
    keep = torch.randperm(len(x))[: args.images]  # a seeded subset keeps the latent cache small
    x, y = x[keep], y[keep.numpy()]
    vae, unet = pipeline.vae, pipeline.unet
    opt = torch.optim.AdamW(vae.parameters(), 2e-3)
    start = time.time()
    for step in range(args.vae_steps):  # autoencoder: reconstruction + a light KL term
        batch = x[torch.randint(0, len(x), (64,))] * 2 - 1
        posterior = vae.encode(batch).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample()).sample, batch) + 1e-6 * posterior.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0:
            log(f"vae step {step} loss {loss.item():.4f}")
    vae.requires_grad_(False).eval()
    with torch.no_grad():  # the latents' spread sets the scaling factor, as for Stable Diffusion
        spread = torch.cat(
            [vae.encode(x[i : i + 256] * 2 - 1).latent_dist.mean for i in range(0, 2048, 256)]
        ).std()
    vae.register_to_config(scaling_factor=float(1 / spread))
    task = TextToImageTask(pipeline)
    with torch.no_grad():
        texts = task.embed_text([caption(c) for c in range(10)])
        latents = torch.cat([task.encode_images(x[i : i + 512]) for i in range(0, len(x), 512)])
    opt = torch.optim.AdamW(unet.parameters(), 1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=args.unet_steps, pct_start=0.05)
    labels = torch.from_numpy(y.astype(np.int64))
    for step in range(args.unet_steps):
        rows = torch.randint(0, len(latents), (64,))
        batch = {"latents": latents[rows], "text": texts[labels[rows]]}
        loss = task.diffusion_loss(unet, batch)
        loss.backward()
        opt.step()
        schedule.step()
        opt.zero_grad()
        if step % 100 == 0:
            log(f"unet step {step} loss {loss.item():.4f}")
    unet.eval()
    pipeline.save_pretrained(f"{ROOT}/base")
    # the new class's data: 600 training images with their caption (never seen by the base)
    new_x, _ = images_of("train", lambda labels: labels == NEW_CLASS)
    os.makedirs(f"{ROOT}/bag/images", exist_ok=True)
    with open(f"{ROOT}/bag/train.jsonl", "w") as fh:
        for i in range(600):
            Image.fromarray((new_x[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(
                f"{ROOT}/bag/images/{i}.png"
            )
            fh.write(json.dumps({"image": f"images/{i}.png", "text": caption(NEW_CLASS)}) + "\n")
    with open(f"{ROOT}/pretrain.json", "w") as fh:
        json.dump({"images": len(x), "vae_steps": args.vae_steps, "unet_steps": args.unet_steps,
                   "seconds": time.time() - start}, fh)  # fmt: skip
    log(f"saved {ROOT}/base and {ROOT}/bag/train.jsonl in {time.time() - start:.0f} s")


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (SIZE // 4) ** 2, 128), nn.ReLU(), nn.Linear(128, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_classifier() -> tuple[nn.Module, float]:
    """A Fashion-MNIST classifier on real SIZE x SIZE images (all 10 classes); returns it and its test accuracy."""
    torch.manual_seed(0)
    x, y = images_of("train", lambda labels: labels >= 0)
    model, labels = SmallCNN(), torch.from_numpy(y.astype(np.int64))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(1500):
        rows = torch.randint(0, len(x), (64,))
        loss = F.cross_entropy(model(x[rows, :1]), labels[rows])
        loss.backward()
        opt.step()
        opt.zero_grad()
    tx, ty = images_of("t10k", lambda labels: labels >= 0)
    with torch.no_grad():
        accuracy = float((model.eval()(tx[:, :1]).argmax(1).numpy() == ty).mean())
    return model, accuracy


def classify(model: nn.Module, images) -> np.ndarray:
    grey = torch.stack([torch.from_numpy(np.asarray(i.convert("L"), np.float32) / 255) for i in images])[
        :, None
    ]
    with torch.no_grad():
        return model(grey).argmax(1).numpy()


def score(args) -> None:
    from diffusers import StableDiffusionPipeline

    from deltatune.train.recipe import load_run

    classifier, accuracy = train_classifier()
    log(f"classifier test accuracy {accuracy:.4f}")
    base = TextToImageTask(D.load_pipeline(f"{ROOT}/base"), num_inference_steps=args.steps)
    adapted_model, adapted, _ = load_run(args.run)
    adapted.num_inference_steps = args.steps
    prompts = [caption(NEW_CLASS)] * args.samples
    base_images = base.generate(prompts, seed=0)
    lora_images = adapted.generate(prompts, seed=0)
    theirs = StableDiffusionPipeline.from_pretrained(f"{ROOT}/base")
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(args.run)
    their_images = theirs(prompts, generator=torch.Generator().manual_seed(0), num_inference_steps=args.steps,
                          guidance_scale=1.0, height=SIZE, width=SIZE).images  # fmt: skip
    gap = max(
        int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())
        for a, b in zip(lora_images, their_images)
    )
    base_hits = float((classify(classifier, base_images) == NEW_CLASS).mean())
    lora_hits = float((classify(classifier, lora_images) == NEW_CLASS).mean())
    os.makedirs("bench/results", exist_ok=True)
    grid = np.concatenate(
        [np.concatenate([np.asarray(i) for i in row[:16]], 1) for row in (base_images, lora_images)], 0
    )
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(
        "bench/results/text_to_image.png"
    )
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": open("/proc/loadavg").read().split()[:3],
        "prompt": caption(NEW_CLASS), "samples": args.samples, "sampling_steps": args.steps,
        "classifier_test_accuracy": accuracy,
        "base_classified_as_new_class": base_hits, "lora_classified_as_new_class": lora_hits,
        "max_pixel_difference_deltatune_vs_diffusers_load_lora_weights": gap,
        "pretrain": json.load(open(f"{ROOT}/pretrain.json")),
        "lora_metrics": json.load(open(os.path.join(args.run, "metrics.json"))),
    }  # fmt: skip
    with open("bench/results/text_to_image.json", "w") as fh:
        json.dump(result, fh, indent=2)
    with open("bench/results/text_to_image.md", "w") as fh:
        fh.write(
            f"# Teaching a small text-to-image model a new class with LoRA ({result['date']})\n\n"
            f'| model | samples of "{caption(NEW_CLASS)}" classified as {FASHION_CLASSES[NEW_CLASS]} |\n'
            "| --- | ---: |\n"
            f"| pretrained base (never saw the class) | {base_hits:.1%} |\n"
            f"| base + LoRA (deltatune) | {lora_hits:.1%} |\n\n"
            f"{args.samples} samples each, same seeds, {args.steps} DDIM steps; classifier: a small CNN trained on real "
            f"Fashion-MNIST ({accuracy:.1%} test accuracy). The same LoRA loaded in diffusers with `load_lora_weights` "
            f"draws the same images (largest pixel difference {gap}/255). Top row: base; bottom: adapted "
            "(text_to_image.png).\n"
        )
    log(json.dumps({k: result[k] for k in ("base_classified_as_new_class", "lora_classified_as_new_class")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain")
    p.add_argument("--vae-steps", type=int, default=400)
    p.add_argument("--unet-steps", type=int, default=1500)
    p.add_argument("--images", type=int, default=9000)
    s = sub.add_parser("score")
    s.add_argument("--run", default="runs/text-to-image-fashion-lora")
    s.add_argument("--samples", type=int, default=64)
    s.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pretrain(args) if args.command == "pretrain" else score(args)


if __name__ == "__main__":
    main()
