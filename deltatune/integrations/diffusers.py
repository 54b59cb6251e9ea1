"""LoRA for diffusion models in the files diffusers reads and writes.

diffusers' `pipeline.load_lora_weights(folder)` reads `pytorch_lora_weights.safetensors`: the LoRA factors under
`unet.<module>.lora_A.weight` / `.lora_B.weight` (peft's names with the component in front) and, in the file's
metadata, the LoRA config (rank, alpha, targets) under `lora_adapter_metadata` with the same prefix. deltatune
writes exactly that (`save_diffusers_lora`), and reads it back, or a file diffusers wrote, onto a UNet
(`load_diffusers_lora`). Files without metadata (older diffusers, kohya-style `.alpha` tensors) get their ranks
from the factor shapes and their alphas from the `.alpha` tensors, or alpha = rank.
"""

from __future__ import annotations

import json
import os

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from deltatune.checkpoint import PREFIX
from deltatune.errors import CheckpointError, ConfigError
from deltatune.methods.lora import LoraConfig
from deltatune.model import PeftModel

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
# LoraConfig fields diffusers passes on to peft's LoraConfig (the rest are peft bookkeeping or unsupported there)
CONFIG_KEYS = ("r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora", "use_dora", "rank_pattern",
               "alpha_pattern", "init_lora_weights", "bias")  # fmt: skip


def diffusers_state(
    peft_model: PeftModel, adapter_name: str = "default", component: str = "unet"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of a LoRA adapter in diffusers' layout."""
    config = peft_model.peft_config[adapter_name]
    if config.peft_type != "LORA":
        raise ConfigError(f"diffusers loads LoRA adapters; this one is {config.peft_type}.")
    if getattr(config, "modules_to_save", None):
        raise ConfigError("diffusers' LoRA files hold LoRA factors only; train without modules_to_save.")
    tensors = {
        f"{component}.{key.removeprefix(PREFIX)}": t.detach().cpu().contiguous()
        for key, t in peft_model.saved_entries(adapter_name).items()
    }
    options = {k: getattr(config, k) for k in CONFIG_KEYS}
    metadata = {f"{component}.{k}": v for k, v in options.items()}
    return tensors, {"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)}


def save_diffusers_lora(
    peft_model: PeftModel, folder: str, adapter_name: str = "default", component: str = "unet"
) -> str:
    """Write `pytorch_lora_weights.safetensors` for `pipeline.load_lora_weights(folder)`; returns its path."""
    tensors, metadata = diffusers_state(peft_model, adapter_name, component)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, WEIGHTS_NAME)
    save_file(tensors, path + ".tmp", metadata=metadata)
    os.replace(path + ".tmp", path)
    return path


def _read(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    file = os.path.join(path, WEIGHTS_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"No diffusers LoRA file at {file}.")
    try:
        with safe_open(file, framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except Exception as err:
        raise CheckpointError(f"{file} is not a readable safetensors file: {err}") from err


def _config_from_shapes(factors: dict[str, torch.Tensor], alphas: dict[str, float]) -> LoraConfig:
    """Ranks from the A factors' shapes, alphas from `.alpha` tensors (or alpha = rank: scaling 1)."""
    ranks = {
        k.removesuffix(".lora_A.weight"): v.shape[0]
        for k, v in factors.items()
        if k.endswith(".lora_A.weight")
    }
    if not ranks:
        raise CheckpointError("The file holds no LoRA factors (no '.lora_A.weight' tensors).")
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha_of = {m: alphas.get(m, float(ranks[m])) for m in ranks}
    alpha = max(set(alpha_of.values()), key=list(alpha_of.values()).count)
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=sorted(ranks),
        rank_pattern={m: v for m, v in ranks.items() if v != r},
        alpha_pattern={m: v for m, v in alpha_of.items() if v != alpha},
    )


def load_diffusers_lora(
    model: nn.Module, path: str, adapter_name: str = "default", component: str = "unet"
) -> PeftModel:
    """A diffusers LoRA file (a folder holding `pytorch_lora_weights.safetensors`, or the file) applied to `model`
    (the pipeline's `component`, e.g. its UNet) as a deltatune PeftModel."""
    tensors, metadata = _read(path)
    prefix = component + "."
    mine = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    if not mine:
        components = sorted({k.split(".", 1)[0] for k in tensors})
        raise CheckpointError(f"{path} has no LoRA weights for {component!r}; it has {components}.")
    factors = {k: v for k, v in mine.items() if ".lora_A." in k or ".lora_B." in k}
    unknown = sorted(set(mine) - set(factors) - {k for k in mine if k.endswith(".alpha")})
    if unknown:
        raise CheckpointError(f"{path} holds tensors deltatune cannot place: {unknown[:3]}.")
    if METADATA_KEY in metadata:
        stored = json.loads(metadata[METADATA_KEY])
        options = {k.removeprefix(prefix): v for k, v in stored.items() if k.startswith(prefix)}
        config = LoraConfig(**{k: v for k, v in options.items() if k in CONFIG_KEYS})
    else:
        alphas = {k.removesuffix(".alpha"): float(v) for k, v in mine.items() if k.endswith(".alpha")}
        config = _config_from_shapes(factors, alphas)
    config.inference_mode = True
    peft_model = PeftModel(model, config, adapter_name)
    try:
        peft_model._load_weights(adapter_name, {PREFIX + k: v for k, v in factors.items()})
    except Exception:
        peft_model.unload()
        raise
    return peft_model.eval()


# --- small pipelines built from configs ---------------------------------------------------------------
def word_tokenizer_files(folder: str, words: list[str]) -> None:
    """vocab.json and merges.txt of a CLIP BPE tokenizer that knows `words` as whole tokens (and every lowercase
    letter), so a small pipeline needs no downloaded tokenizer."""
    vocab: dict[str, int] = {}
    merges: list[str] = []
    for token in ["<|startoftext|>", "<|endoftext|>"] + [chr(c) for c in range(33, 127)]:
        vocab.setdefault(token, len(vocab))
    for c in range(33, 127):
        vocab.setdefault(chr(c) + "</w>", len(vocab))
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as fh:
        json.dump(vocab, fh)
    with open(os.path.join(folder, "merges.txt"), "w") as fh:
        fh.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")


def build_pipeline(folder: str, words: list[str], image_size: int = 32, width: int = 32, seed: int = 0):
    """A small Stable Diffusion pipeline (UNet with cross-attention, KL autoencoder that halves each side, CLIP
    text encoder, DDIM scheduler) built from configs with random weights and saved to `folder`: a base to
    pretrain on small images, in the layout every diffusers LoRA tool reads."""
    word_tokenizer_files(os.path.join(folder, "tokenizer"), words)
    tokenizer = CLIPTokenizer(
        os.path.join(folder, "tokenizer", "vocab.json"),
        os.path.join(folder, "tokenizer", "merges.txt"),
        model_max_length=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                           bos_token_id=0, eos_token_id=1, pad_token_id=1)
        )  # fmt: skip
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(width, 2 * width),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, norm_num_groups=8, sample_size=image_size,
        )  # fmt: skip
        unet = UNet2DConditionModel(
            sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(width, 2 * width), norm_num_groups=8, cross_attention_dim=width,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
        )  # fmt: skip
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(
            num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False, set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipeline.save_pretrained(folder)
    return pipeline


def load_pipeline(folder: str):
    """A diffusers pipeline from a local folder (offline; a hub name only when online)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"No diffusers pipeline folder at {folder}.")
    diffusers.utils.logging.disable_progress_bar()
    try:
        pipeline = DiffusionPipeline.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder} is not a diffusers pipeline folder: {err}") from err
    pipeline.set_progress_bar_config(disable=True)
    if not hasattr(pipeline, "unet"):
        raise ConfigError(f"{folder} holds a {type(pipeline).__name__}; deltatune adapts UNet pipelines.")
    return pipeline
