"""Images in and out for the vision tasks: reading a row's image (a file or base64), tensors, drawn boxes, coloured
masks and PNGs as base64 (so predictions travel as JSON).

A row names its image as a path (relative paths are tried against the data file's folder) or as base64, with or
without a `data:image/...;base64,` prefix. Reading paths can be switched off (`read_files=False`), as a server
should for requests from the network.
"""

from __future__ import annotations

import base64
import binascii
import colorsys
import io
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from deltatune.errors import DataError


def _looks_like_base64(value: str) -> bool:
    return value.startswith("data:image/") or (len(value) > 256 and os.sep not in value[:64])


def open_image(value: str, base_dir: str | None = None, read_files: bool = True) -> Image.Image:
    """An RGB PIL image from a path or base64 text."""
    if not isinstance(value, str) or not value:
        raise DataError(f"An image must be a file path or base64 text, got {type(value).__name__}.")
    if _looks_like_base64(value):
        try:
            data = base64.b64decode(
                value.split(",", 1)[1] if value.startswith("data:") else value, validate=True
            )
        except (binascii.Error, ValueError) as err:
            raise DataError(f"Image data is not valid base64: {err}") from err
        source = io.BytesIO(data)
    elif not read_files:
        raise DataError("Images must be sent as base64 here (file paths are not read).")
    else:
        source = resolve(value, base_dir)
    try:
        return Image.open(source).convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"Not an image PIL can read: {value[:80]} ({err})") from err


def resolve(path: str, base_dir: str | None) -> str:
    """A data file's path: as given, else relative to the data's folder."""
    if not os.path.isabs(path) and not os.path.exists(path) and base_dir:
        path = os.path.join(base_dir, path)
    if not os.path.isfile(path):
        raise DataError(
            f"File not found: {path} (relative paths are read from {base_dir or 'the working directory'})."
        )
    return path


def open_mask(path: str, base_dir: str | None = None) -> torch.Tensor:
    """A mask PNG (one class index per pixel, single channel) as an (H, W) int64 tensor."""
    path = resolve(path, base_dir)
    mask = Image.open(path)
    if mask.mode not in ("L", "P", "I", "I;16"):
        raise DataError(
            f"{path} is a {mask.mode} image; a mask holds one class index per pixel (mode L or P PNG)."
        )
    return torch.from_numpy(np.array(mask, dtype=np.int64))


def data_dir(source: str | None, fallback: str | None = None) -> str | None:
    """The folder relative image paths of a data file are read from: the file's own, else `fallback` (the
    training file's, for tables split from it)."""
    if source and os.path.isfile(source):
        return os.path.dirname(os.path.abspath(source))
    return fallback


def to_tensor(image: Image.Image, size: int | None = None) -> torch.Tensor:
    """(3, H, W) uint8 tensor, resized to size x size when given (compact to keep a data set in memory)."""
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def to_image(pixels: torch.Tensor) -> Image.Image:
    """A (3, H, W) uint8 or [0, 1] float tensor as a PIL image."""
    if pixels.is_floating_point():
        pixels = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def save_image(image: Image.Image, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
    return path


def palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct colours per class; class 0 (background) is black."""
    colours = [(0, 0, 0)]
    for i in range(1, num_classes):
        hue = (i * 0.618034) % 1.0
        r, g, b = (int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.75, 0.95))
        colours.append((r, g, b))
    return colours


def colour_mask(mask: torch.Tensor, num_classes: int) -> Image.Image:
    """A class-index mask as a palette PNG image (indices kept, so it reads back as the mask itself)."""
    image = Image.fromarray(mask.to(torch.uint8).cpu().numpy(), mode="L").convert("P")
    flat = [c for rgb in palette(max(num_classes, 1)) for c in rgb]
    image.putpalette(flat + [0] * (768 - len(flat)))
    return image


def draw_boxes(
    pixels: torch.Tensor, boxes: torch.Tensor, captions: list[str], num_classes: int, class_ids: list[int]
) -> Image.Image:
    """The image with each box drawn in its class's colour and captioned."""
    from torchvision.utils import draw_bounding_boxes

    if pixels.is_floating_point():
        pixels = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    colours = palette(num_classes + 1)
    drawn = draw_bounding_boxes(
        pixels.cpu(), boxes.cpu(), labels=captions, colors=[colours[c + 1] for c in class_ids], width=2
    )
    return to_image(drawn)
