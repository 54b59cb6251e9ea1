"""LoRA for diffusion models: deltatune's files load in diffusers (`load_lora_weights`) with the same images for the
same seed, diffusers' files load in deltatune with the same UNet outputs, and the recipe trains end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import deltatune as dt
from deltatune.apps.cli import app
from deltatune.errors import CheckpointError
from deltatune.integrations import diffusers as D
from deltatune.train.recipe import load_recipe, train_from_recipe
from deltatune.train.tasks import TextToImageTask
from deltatune.train.tasks.text_to_image import ATTENTION_PROJECTIONS

pytest.importorskip("peft")  # diffusers loads LoRA through peft
WORDS = ["a", "photo", "of", "red", "blue", "square"]
PROMPT = "a photo of a red square"


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline") / "base"
    D.build_pipeline(str(folder), WORDS, image_size=16, width=16)
    return folder


def lora_unet(pipeline, seed=0):
    model = dt.get_peft_model(
        pipeline.unet, dt.LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION_PROJECTIONS)
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


def pixels(images):
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


def test_diffusers_loads_the_lora_and_draws_the_same_images(pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    ours = D.load_pipeline(str(pipeline_dir))
    task = TextToImageTask(ours, num_inference_steps=4)
    base_images = pixels(task.generate([PROMPT], seed=3))
    model = lora_unet(ours)
    our_images = pixels(task.generate([PROMPT], seed=3))
    assert np.abs(our_images - base_images).max() > 8  # the adapter changes the picture
    D.save_diffusers_lora(model, str(tmp_path / "lora"))

    theirs = StableDiffusionPipeline.from_pretrained(str(pipeline_dir))
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(tmp_path / "lora"))
    generator = torch.Generator().manual_seed(3)
    their_images = pixels(
        theirs(
            PROMPT, generator=generator, num_inference_steps=4, guidance_scale=1.0, height=16, width=16
        ).images
    )
    assert np.abs(their_images - our_images).max() <= 1  # uint8 rounding at most

    # and back: the file diffusers holds now, saved by diffusers, loads into deltatune with the same UNet outputs
    from peft.utils import get_peft_model_state_dict

    adapter = theirs.unet.active_adapters()[0]
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "from-diffusers"),
        unet_lora_layers=get_peft_model_state_dict(theirs.unet, adapter_name=adapter),
        unet_lora_adapter_metadata=theirs.unet.peft_config[adapter].to_dict(),
    )
    fresh = D.load_pipeline(str(pipeline_dir))
    loaded = D.load_diffusers_lora(fresh.unet, str(tmp_path / "from-diffusers"))
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, t, encoder_hidden_states=text).sample,
            theirs.unet(x, t, encoder_hidden_states=text).sample,
            atol=1e-5,
            rtol=1e-4,
        )


def test_a_file_without_metadata_takes_ranks_from_shapes_and_alphas_from_alpha_tensors(
    pipeline_dir, tmp_path
):
    from safetensors.torch import save_file

    model = lora_unet(D.load_pipeline(str(pipeline_dir)))
    tensors, _ = D.diffusers_state(model)
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors}
    save_file(
        {**tensors, **{f"{m}.alpha": torch.tensor(8.0) for m in modules}}, tmp_path / "plain.safetensors"
    )
    loaded = D.load_diffusers_lora(
        D.load_pipeline(str(pipeline_dir)).unet, str(tmp_path / "plain.safetensors")
    )
    config = loaded.peft_config["default"]
    assert (config.r, config.lora_alpha) == (4, 8.0)
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([200]), torch.randn(1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, t, encoder_hidden_states=text).sample, model(x, t, encoder_hidden_states=text).sample
        )
    save_file({"text_encoder.x.lora_A.weight": torch.zeros(1, 1)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="no LoRA weights for 'unet'"):
        D.load_diffusers_lora(D.load_pipeline(str(pipeline_dir)).unet, str(tmp_path / "other.safetensors"))


def test_text_to_image_recipe_learns_saves_for_diffusers_and_predicts(pipeline_dir, tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(8):
        colour = "red" if i % 2 else "blue"
        image = np.zeros((16, 16, 3), np.uint8)
        image[4:12, 4:12] = (230, 20, 20) if colour == "red" else (20, 20, 230)
        Image.fromarray(image).save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "text": f"a photo of a {colour} square"})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = load_recipe(None, {
        "model": str(pipeline_dir), "task": "text-to-image", "method": "lora", "lora": {"r": 4, "lora_alpha": 4},
        "train_file": str(tmp_path / "data.jsonl"), "eval_file": str(tmp_path / "data.jsonl"),
        "eval_overlap": "keep",  # scored on its own training images: the fixed-noise loss must fall
        "output_dir": str(tmp_path / "run"), "max_steps": 25, "batch_size": 8, "lr": 1e-2, "eval_every": 25,
        "num_inference_steps": 3, "progress": False, "tensorboard": False, "plot": False, "num_threads": 1,
    })  # fmt: skip
    result = train_from_recipe(raw)
    history = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    first_loss = history[0]["loss"]
    assert result["metrics"]["eval_loss"] < first_loss  # fixed-noise loss below the first step's
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(ATTENTION_PROJECTIONS)
    assert (tmp_path / "run" / D.WEIGHTS_NAME).is_file()
    request = tmp_path / "rows.jsonl"
    request.write_text(json.dumps({"prompt": PROMPT, "seed": 1, "output": str(tmp_path / "out.png")}) + "\n")
    answer = CliRunner().invoke(app, ["predict", str(tmp_path / "run"), "--file", str(request)])
    assert answer.exit_code == 0, answer.output
    assert Image.open(tmp_path / "out.png").size == (16, 16)
    # served: /v1/generate-image draws the same picture; adapter null draws the base pipeline's
    import base64
    import io

    from fastapi.testclient import TestClient

    from deltatune.apps.serve import ServeSettings, build_engine, create_app

    engine = build_engine(None, {"squares": str(tmp_path / "run")}, "text-to-image")
    with TestClient(create_app(engine, ServeSettings())) as client:
        served = {}
        for name in ("squares", None):
            reply = client.post(
                "/v1/generate-image", json={"adapter": name, "inputs": [{"prompt": PROMPT, "seed": 1}]}
            )
            assert reply.status_code == 200, reply.text
            data = base64.b64decode(reply.json()["results"][0]["image_png_base64"])
            served[name] = pixels([Image.open(io.BytesIO(data)).convert("RGB")])
        too_long = {"adapter": "squares", "inputs": [{"prompt": PROMPT, "num_inference_steps": 10**6}]}
        assert client.post("/v1/generate-image", json=too_long).status_code == 400
    assert np.array_equal(served["squares"], pixels([Image.open(tmp_path / "out.png").convert("RGB")]))
    assert not np.array_equal(served["squares"], served[None])
