"""Vision beyond transformers: LoRA/IA3/BitFit on CNN convolutions (checked against peft), detection and
segmentation recipes end to end on tiny backbones and synthetic scenes, and their metrics against hand counts."""

import io
import json
import random
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

import deltatune as dt
from deltatune.apps.cli import app
from deltatune.errors import CheckpointError, ConfigError, DataError
from deltatune.integrations import vision as V
from deltatune.train import metrics as M
from deltatune.train.recipe import load_recipe, load_run, train_from_recipe

TINY = {"width_mult": 0.25}  # MobileNetV2 at a quarter width: the real architecture, about 0.2M weights
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
runner = CliRunner()


def tiny_classifier(seed=0, num_labels=3):
    torch.manual_seed(seed)
    model, head = V.build_classifier("torchvision:mobilenet_v2", num_labels, options=TINY)
    return model.eval(), head


def scene(rng, size=64):
    """Noise with one or two filled squares; returns (image, [(box, colour)], mask with class index + 1)."""
    pixels = np.array(rng.integers(0, 90, (size, size, 3)), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    objects = []
    for k in range(int(rng.integers(1, 3))):
        side = int(rng.integers(14, 24))
        x, y = (int(v) for v in rng.integers(0, size - side, 2)) if k == 0 else (size - side - 2, 2)
        if objects and not (x + side <= objects[0][0][0] or y + side <= objects[0][0][1]):
            continue
        name = ["red", "blue"][int(rng.integers(0, 2))]
        pixels[y : y + side, x : x + side] = COLOURS[name]
        mask[y : y + side, x : x + side] = 1 + ["red", "blue"].index(name)
        objects.append(([x, y, x + side, y + side], name))
    return pixels, objects, mask


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """COCO JSON for detection and image/mask JSONL for segmentation, same 24 synthetic scenes."""
    root = tmp_path_factory.mktemp("scenes")
    (root / "img").mkdir()
    (root / "mask").mkdir()
    rng = np.random.default_rng(0)
    coco = {
        "images": [],
        "annotations": [],
        "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}],
    }
    rows = []
    for i in range(24):
        pixels, objects, mask = scene(rng)
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
        Image.fromarray(mask).save(root / "mask" / f"{i}.png")
        coco["images"].append({"id": i, "file_name": f"img/{i}.png", "width": 64, "height": 64})
        for (x1, y1, x2, y2), name in objects:
            category = 1 if name == "red" else 2
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]),
                    "image_id": i,
                    "category_id": category,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                }
            )
        rows.append({"image": f"img/{i}.png", "mask": f"mask/{i}.png"})
    (root / "coco.json").write_text(json.dumps(coco))
    (root / "seg.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def recipe(root, task, **extra):
    base = {
        "model": "torchvision:mobilenet_v2",
        "model_options": TINY,
        "task": task,
        "method": "lora",
        "lora": {"r": 4, "lora_alpha": 8},
        "image_size": 64,
        "output_dir": str(root / f"run-{task}"),
        "batch_size": 8,
        "lr": 5e-3,
        "progress": False,
        "tensorboard": False,
        "plot": False,
        "num_threads": 1,
        "seed": 0,
    }
    return load_recipe(None, {**base, **extra})


# --- methods on convolutions, against peft ------------------------------------------------------------
def test_lora_and_ia3_on_cnn_convolutions_match_peft(tmp_path):
    peft = pytest.importorskip("peft")
    x = torch.rand(2, 3, 32, 32)
    model, head = tiny_classifier()
    targets = V.backbone_targets(model, skip=(head,))
    assert targets and all(model.get_submodule(t).groups == 1 for t in targets)  # depthwise convs left out
    for ours_cfg, theirs_cfg in (
        (dt.LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=[head]),
         peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=[head])),
        (dt.IA3Config(target_modules=targets, feedforward_modules=targets[1::2], modules_to_save=[head]),
         peft.IA3Config(target_modules=targets, feedforward_modules=targets[1::2], modules_to_save=[head])),
    ):  # fmt: skip
        ours = dt.get_peft_model(tiny_classifier()[0], ours_cfg)
        torch.manual_seed(1)
        with torch.no_grad():  # a trained-looking adapter: every adapter tensor away from its start
            for _name, p in ours.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        ours.save_pretrained(tmp_path / ours_cfg.peft_type)
        theirs = peft.PeftModel.from_pretrained(tiny_classifier()[0], tmp_path / ours_cfg.peft_type).eval()
        with torch.no_grad():
            expected = ours(x)
            torch.testing.assert_close(theirs(x), expected, atol=1e-5, rtol=1e-4)
            with ours.disable_adapter():
                torch.testing.assert_close(ours(x), tiny_classifier()[0](x), atol=1e-6, rtol=1e-5)
            merged = ours.merge_and_unload()
            torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-4)
        peft_side = peft.get_peft_model(tiny_classifier()[0], theirs_cfg)
        assert sum(p.numel() for p in peft_side.parameters() if p.requires_grad) == sum(
            p.numel()
            for p in dt.get_peft_model(tiny_classifier()[0], ours_cfg).parameters()
            if p.requires_grad
        )


@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:efficientnet_lite0", "timm:convnext_atto"])
def test_lora_on_torchvision_and_timm_cnns_matches_peft(name, tmp_path):
    """The default targets of other CNN families (random weights, built under a fixed seed): a saved LoRA gives
    peft the same outputs."""
    peft = pytest.importorskip("peft")
    model, head = V.build_classifier(name, 3)
    targets = V.backbone_targets(model, skip=(head,))
    assert targets and head not in targets
    ours = dt.get_peft_model(
        model, dt.LoraConfig(r=2, lora_alpha=4, target_modules=targets, modules_to_save=[head])
    ).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(V.build_classifier(name, 3)[0], tmp_path).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = ours(x)
        with ours.disable_adapter():
            assert not torch.allclose(ours(x), expected, atol=1e-4)  # the adapter does change the output
        torch.testing.assert_close(theirs(x), expected, atol=1e-5, rtol=1e-4)


def test_bitfit_on_a_cnn_trains_its_norm_biases():
    model, head = tiny_classifier()
    peft_model = dt.get_peft_model(model, dt.BitFitConfig(modules_to_save=[head]))
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any(".1.bias" in n for n in trained)  # BatchNorm biases (the convolutions have none)
    assert all(n.endswith("bias") or "modules_to_save" in n for n in trained)


def test_backbone_weights_are_read_from_safetensors_only(tmp_path):
    model, _ = tiny_classifier()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="safetensors"):
        V.build_classifier("torchvision:mobilenet_v2", 3, str(tmp_path / "w.pth"), TINY)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    loaded, head = V.build_classifier("torchvision:mobilenet_v2", 5, str(tmp_path / "w.safetensors"), TINY)
    torch.testing.assert_close(loaded.features[3].conv[0][0].weight, model.features[3].conv[0][0].weight)
    assert loaded.get_submodule(head).out_features == 5  # the head is fresh, sized for the labels
    with pytest.raises(CheckpointError, match="does not fit"):
        V.build_classifier(
            "torchvision:mobilenet_v2", 5, str(tmp_path / "w.safetensors"), {"width_mult": 0.5}
        )
    with pytest.raises(ConfigError, match="library:architecture"):
        V.build_classifier("mobilenet_v2", 5)


# --- metrics against hand counts ----------------------------------------------------------------
def test_detection_scores_against_hand_counts():
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 70]])
    refs = [{"boxes": boxes, "labels": torch.tensor([0, 1, 1])}]
    perfect = [{"boxes": boxes, "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([0, 1, 1])}]
    scores = M.detection_scores(perfect, refs, ["a", "b"])
    assert scores["map"] == pytest.approx(1.0) and scores["recall@100"] == pytest.approx(1.0)
    # class b: one of two found (recall 0.5); class a: its box found but shifted to IoU 0.68 (found at 0.5)
    shifted = torch.tensor([[2.0, 0, 12, 10], [20, 20, 40, 40]])
    half = [{"boxes": shifted, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])}]
    scores = M.detection_scores(half, refs, ["a", "b"])
    assert scores["recall@100"] == pytest.approx((1.0 + 0.5) / 2)
    assert scores["map_50"] == pytest.approx((1.0 + 0.5) / 2, abs=0.01)


def test_segmentation_scores_against_hand_counts():
    ref = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 2, 2]])
    scores = M.segmentation_scores([pred], [ref], ["bg", "a", "b"])
    # 7 labelled pixels, 5 right; IoU bg = 3/4, a = 2/4, b = 0/1 (predicted once, never true)
    assert scores["pixel_accuracy"] == pytest.approx(5 / 7)
    assert scores["iou_per_class"] == pytest.approx({"bg": 0.75, "a": 0.5, "b": 0.0})
    assert scores["mean_iou"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)


# --- tasks end to end -----------------------------------------------------------------------------
def _base_buffers(model):
    return {
        k: v.clone()
        for k, v in model.get_base_model().state_dict().items()
        if "running" in k and "modules_to_save" not in k and "original_module" not in k
    }


@pytest.fixture(scope="module")
def detection_run(scenes, tmp_path_factory):
    """A detection run trained for 8 steps: (its folder, its metrics)."""
    root = tmp_path_factory.mktemp("detection")
    raw = recipe(root, "detection", train_file=str(scenes / "coco.json"), max_steps=8, eval_every=0)
    return root / "run-detection", train_from_recipe(raw)["metrics"]


def test_detection_recipe_trains_saves_reloads_and_draws(scenes, detection_run, tmp_path):
    run, metrics = detection_run
    assert {"eval_map", "eval_map_50", "eval_recall@100", "eval_mar_100"} <= set(metrics)
    assert 0.0 <= metrics["eval_recall@100"] <= 1.0
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["fpn", "head"] and all("body" in t for t in config["target_modules"])
    # the folder alone (adapter + heads; batch-norm statistics never moved) gives the trained model's scores
    model, task, run_config = load_run(str(run))
    from deltatune.train.recipe import load_splits, prepare_tables

    tables = prepare_tables(
        run_config, load_splits(run_config, 0), {"train": "", "validation": "", "test": ""}
    )
    features = task.prepare(tables["validation"], str(scenes / "coco.json"))
    assert task.evaluate(model, features, 8)["map"] == pytest.approx(metrics["eval_map"], abs=1e-6)
    out = task.predict(
        model,
        [
            {
                "image": str(scenes / "img" / "0.png"),
                "min_score": 0.0,
                "output": str(tmp_path / "boxes.png"),
                "return_image": True,
            }
        ],
    )
    assert Image.open(out[0]["output"]).size == (64, 64) and out[0]["image_png_base64"]
    assert all(d["label"] in ("red", "blue") and len(d["box"]) == 4 for d in out[0]["detections"])


def test_detection_reads_coco_jsonl_and_csv_rows_alike(scenes, tmp_path):
    import csv

    from deltatune.train.data import load_table
    from deltatune.train.recipe import check_labels, fit_labels, split_recipe
    from deltatune.train.tasks import DetectionTask

    coco = json.loads((scenes / "coco.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    rows = {
        i["id"]: {"image": str(scenes / i["file_name"]), "boxes": [], "labels": []} for i in coco["images"]
    }
    for ann in coco["annotations"]:  # COCO's [x, y, width, height] as [x1, y1, x2, y2]
        x, y, w, h = ann["bbox"]
        rows[ann["image_id"]]["boxes"].append([x, y, x + w, y + h])
        rows[ann["image_id"]]["labels"].append(names[ann["category_id"]])
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    with open(tmp_path / "rows.csv", "w", newline="") as fh:  # list cells as JSON text
        writer = csv.writer(fh)
        writer.writerow(["image", "boxes", "labels"])
        writer.writerows([r["image"], json.dumps(r["boxes"]), json.dumps(r["labels"])] for r in rows.values())
    raw = recipe(tmp_path, "detection", train_file=str(tmp_path / "rows.csv"), label_column="labels")
    run = split_recipe(raw)[0]
    tables = {
        n: load_table(str(scenes / "coco.json" if n == "train" else tmp_path / f"rows.{n}"))
        for n in ("train", "jsonl", "csv")
    }
    labels = fit_labels(run, tables["csv"])
    assert labels.names == fit_labels(run, tables["train"]).names == ["blue", "red"]
    check_labels(run, labels, tables, {n: n for n in tables})  # CSV label cells are lists of names too
    task = DetectionTask(labels, image_size=64)
    features = {n: task.prepare(t, str(tmp_path / "x")) for n, t in tables.items()}
    for key in ("pixels", "boxes", "labels"):
        for name in ("jsonl", "csv"):
            assert all(
                torch.equal(a[key], b[key]) for a, b in zip(features["train"], features[name], strict=True)
            )
    (tmp_path / "bad.csv").write_text("image,boxes,labels\n" + f"{rows[0]['image']},10 20 30 40,red\n")
    with pytest.raises(DataError, match="boxes must be a JSON list"):
        task.prepare(load_table(str(tmp_path / "bad.csv")), "bad.csv")


def test_server_shares_one_backbone_between_detection_runs(scenes, detection_run, tmp_path):
    """Two runs as adapters on one backbone answer /v1/detect exactly as each run alone answers `predict`."""
    import base64

    from fastapi.testclient import TestClient

    from deltatune.apps.serve import ServeSettings, build_engine, create_app

    first, _ = detection_run
    raw = recipe(tmp_path, "detection", train_file=str(scenes / "coco.json"), max_steps=2, seed=1, lr=2e-2)
    train_from_recipe(raw)
    second = tmp_path / "run-detection"
    image = "data:image/png;base64," + base64.b64encode((scenes / "img" / "5.png").read_bytes()).decode()
    rows = [{"image": image, "min_score": 0.0}]
    alone = {}
    for name, folder in (("a", first), ("b", second)):
        model, task, _ = load_run(str(folder))
        alone[name] = task.predict(model, rows)
    assert alone["a"] != alone["b"]  # so answering with the wrong run's adapter or heads would be caught
    engine = build_engine(None, {"a": str(first), "b": str(second)}, "detection")
    assert len({id(t) for t in engine.tasks.values()}) == 2 and engine.model.peft_config.keys() == {"a", "b"}
    with TestClient(create_app(engine, ServeSettings(adapter_root=str(tmp_path)))) as client:
        for name in ("b", "a", "b"):
            answer = client.post("/v1/detect", json={"adapter": name, "inputs": rows})
            assert answer.status_code == 200, answer.text
            assert answer.json()["results"] == alone[name]
        # /v1/predict answers the same; a run found under the adapter root loads on first use, onto the same base
        answer = client.post("/v1/predict", json={"adapter": "a", "rows": rows})
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"] == alone["a"]
        answer = client.post("/v1/detect", json={"adapter": second.name, "inputs": rows})
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"] == alone["b"]
        assert engine.model.peft_config.keys() == {"a", "b", second.name}
        drawn = client.post(
            "/v1/detect", json={"adapter": "a", "inputs": [{**rows[0], "return_image": True}]}
        )
        assert Image.open(
            io.BytesIO(base64.b64decode(drawn.json()["results"][0]["image_png_base64"]))
        ).size == (64, 64)
        refused = {
            "a path": {"adapter": "a", "inputs": [{"image": str(scenes / "img" / "5.png")}]},
            "a file to write": {"adapter": "a", "inputs": [{**rows[0], "output": str(tmp_path / "x.png")}]},
            "no adapter": {"adapter": None, "inputs": rows},
        }
        for why, body in refused.items():
            assert client.post("/v1/detect", json=body).status_code == 400, why
        assert client.post("/v1/segment", json={"adapter": "a", "inputs": rows}).status_code == 400
    other = tmp_path / "other"  # the same run, as if trained on larger images: another backbone input
    shutil.copytree(second, other)
    config = yaml.safe_load((other / "run_config.yaml").read_text())
    (other / "run_config.yaml").write_text(yaml.safe_dump({**config, "image_size": 96}))
    with pytest.raises(CheckpointError, match="image_size"):
        engine.load("c", str(other))


def test_adapting_never_moves_base_batch_norm_statistics(scenes, tmp_path):
    from deltatune.train import TrainConfig, Trainer
    from deltatune.train.data import LabelMap, load_table
    from deltatune.train.tasks import DetectionTask

    task = DetectionTask(LabelMap(["blue", "red"]), image_size=64)
    torch.manual_seed(0)
    model = V.build_detector("torchvision:mobilenet_v2", 2, 64, options=TINY)
    model = dt.get_peft_model(
        model,
        dt.LoraConfig(
            r=2, target_modules=V.backbone_targets(model, "backbone.body"), modules_to_save=["fpn", "head"]
        ),
    )
    before = _base_buffers(model)
    features = task.prepare(load_table(str(scenes / "coco.json")), str(scenes / "coco.json"))
    Trainer(
        model,
        task,
        features[:8],
        None,
        TrainConfig(
            output_dir=str(tmp_path), max_steps=2, batch_size=4, progress=False, tensorboard=False, plot=False
        ),
    ).train()
    after = _base_buffers(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_segmentation_recipe_learns_and_writes_coloured_masks(scenes, tmp_path):
    raw = recipe(
        tmp_path, "segmentation", train_file=str(scenes / "seg.jsonl"), labels=["background", "red", "blue"],
        max_steps=60, lr=3e-2, split=[0.75, 0.25, 0.0],
    )  # fmt: skip
    metrics = train_from_recipe(raw)["metrics"]
    # colour decides the class here; the background-only answer would score mean IoU about 0.3
    assert metrics["eval_pixel_accuracy"] > 0.9 and metrics["eval_mean_iou"] > 0.45
    assert set(metrics["eval_iou_per_class"]) <= {"background", "red", "blue"}
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"image": str(scenes / "img" / "3.png"), "output": str(tmp_path / "m.png")}) + "\n"
    )
    result = runner.invoke(app, ["predict", str(tmp_path / "run-segmentation"), "--file", str(rows)])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output.strip().splitlines()[-1])
    assert sum(answer["class_fractions"].values()) == pytest.approx(1.0, abs=1e-3)
    written = np.array(Image.open(tmp_path / "m.png"))
    assert written.shape == (64, 64) and written.max() <= 2  # the palette PNG keeps the class indices


def test_segmentation_rejects_a_mask_value_outside_the_labels(scenes, tmp_path):
    raw = recipe(
        tmp_path,
        "segmentation",
        train_file=str(scenes / "seg.jsonl"),
        labels=["background", "red"],
        max_steps=1,
    )
    with pytest.raises(DataError, match="mask value 2"):
        train_from_recipe(raw)


def test_image_classification_on_a_cnn_from_a_recipe(tmp_path):
    rng = random.Random(0)
    lines = ["image,label"]
    (tmp_path / "img").mkdir()
    for i in range(32):
        name = rng.choice(list(COLOURS))
        Image.new("RGB", (20, 20), COLOURS[name]).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,{name}")
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    raw = recipe(
        tmp_path,
        "image-cls",
        train_file=str(tmp_path / "data.csv"),
        image_size=32,
        max_steps=10,
        lr=5e-2,
        split=[0.75, 0.25, 0.0],
    )
    metrics = train_from_recipe(raw)["metrics"]
    assert metrics["eval_accuracy"] >= 0.75  # red vs blue on a random quarter-width backbone; chance is 0.5
    model, task, _ = load_run(str(tmp_path / "run-image-cls"))
    import base64

    encoded = base64.b64encode((tmp_path / "img" / "0.png").read_bytes()).decode()
    out = task.predict(
        model, [{"image": str(tmp_path / "img" / "0.png")}, {"image": "data:image/png;base64," + encoded}]
    )
    assert out[0]["label"] == out[1]["label"] == lines[1].split(",")[1]
    # `deltatune merge` writes the merged weights; they load into the bare architecture with the same outputs
    result = runner.invoke(app, ["merge", str(tmp_path / "run-image-cls"), str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    plain, _ = V.build_classifier("torchvision:mobilenet_v2", 2, options=TINY)
    plain.load_state_dict(load_file(tmp_path / "merged" / "model.safetensors"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = load_run(str(tmp_path / "run-image-cls"))[0](x)
        torch.testing.assert_close(plain.eval()(x), expected, atol=1e-5, rtol=1e-4)
    # the frozen-backbone linear probe: the head alone trains
    probe = recipe(tmp_path, "image-cls", train_file=str(tmp_path / "data.csv"), image_size=32, max_steps=2, method="freeze", lora=None,
                   freeze={"num_trainable_layers": 0, "train_head": False}, output_dir=str(tmp_path / "probe"))  # fmt: skip
    summary = train_from_recipe(probe)["summary"]
    assert summary["trainable_params"] == 1280 * 2 + 2  # the 1280 -> 2 linear head


def test_images_from_the_network_are_base64_only(tmp_path):
    import base64

    from deltatune.train.images import open_image

    Image.new("RGB", (5, 4), (1, 2, 3)).save(tmp_path / "a.png")
    encoded = "data:image/png;base64," + base64.b64encode((tmp_path / "a.png").read_bytes()).decode()
    assert open_image(encoded, read_files=False).size == (5, 4)
    with pytest.raises(DataError, match="base64"):
        open_image(str(tmp_path / "a.png"), read_files=False)  # a server never reads a path it was sent
    with pytest.raises(DataError, match="not valid base64"):
        open_image("data:image/png;base64,@@@")
