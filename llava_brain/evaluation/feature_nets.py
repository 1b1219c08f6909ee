"""The networks of the high-level reconstruction metrics, loaded the way their ecosystems store them, offline.

    network      metrics               node            weights
    alexnet      alexnet2, alexnet5    features.4/.11  torchvision AlexNet_Weights.IMAGENET1K_V1
    inceptionv3  inceptionv3           avgpool         torchvision Inception_V3_Weights.IMAGENET1K_V1
    clip         clip                  image_embeds    CLIP ViT-L/14 (transformers CLIPVisionModelWithProjection)
    effnet       effnet                avgpool         torchvision EfficientNet_B1_Weights.IMAGENET1K_V1
    swav         swav                  avgpool         SwAV ResNet-50 (facebookresearch/swav, 800 epochs)

torchvision weights are read from torchvision's own cache, `$TORCH_HOME/hub/checkpoints/<file>` (the file
name is the last part of the weights enum's URL, e.g. alexnet-owt-7be5be79.pth: where `weights=...` would
have downloaded it), or from `weights_dir/<file>`; `torch.load(weights_only=True)` and a strict
`load_state_dict` into the architecture built without weights. SwAV is torchvision's resnet50 with SwAV's
state dict (`swav_800ep_pretrain.pth.tar`, where `torch.hub.load("facebookresearch/swav:main", "resnet50")`
caches it; "module." prefixes stripped, the projection head and prototypes dropped, `fc` left as built: it
comes after avgpool). CLIP comes from a folder or a hub id already in the Hugging Face cache.

A network whose weights are absent raises `NetworkUnavailable` (its reason says which file is missing and how
to get it); weights that are present but wrong are bad input (`BadInputError`). Torchvision networks and SwAV
get ImageNet normalisation, CLIP its processor's (OpenAI's) normalisation.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn

from llava_brain.errors import BadInputError
from llava_brain.evaluation.image_metrics import resize

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
SWAV_FILE = "swav_800ep_pretrain.pth.tar"
SWAV_URL = f"https://dl.fbaipublicfiles.com/deepcluster/{SWAV_FILE}"
NETWORKS = ("alexnet", "inceptionv3", "clip", "effnet", "swav")
# metric -> (network, node whose output is the feature)
METRIC_NODES = {
    "alexnet2": ("alexnet", "features.4"), "alexnet5": ("alexnet", "features.11"),
    "inceptionv3": ("inceptionv3", "avgpool"), "clip": ("clip", "image_embeds"),
    "effnet": ("effnet", "avgpool"), "swav": ("swav", "avgpool"),
}  # fmt: skip
OWN_SIZES = {"alexnet": 224, "inceptionv3": 299, "effnet": 240, "swav": 224}  # torchvision's; CLIP: its config
# torchvision builder, weights enum, builder arguments (those `weights=...` would set, so the state dict fits)
_TORCHVISION = {
    "alexnet": ("alexnet", "AlexNet_Weights", {}),
    "inceptionv3": ("inception_v3", "Inception_V3_Weights", {"aux_logits": True, "transform_input": True,
                                                             "init_weights": False}),
    "effnet": ("efficientnet_b1", "EfficientNet_B1_Weights", {}),
}  # fmt: skip


class NetworkUnavailable(Exception):
    """A metric network's weights are not on this machine: `path` is what is missing, `str(err)` one line
    saying how to get it."""

    def __init__(self, network: str, path: str | Path, how: str):
        self.network, self.path, self.how = network, str(path), how
        super().__init__(f"{path} missing; {how}")


def network_of(metric: str) -> str:
    return METRIC_NODES[metric][0]


def metrics_of(network: str, metrics: Sequence[str]) -> dict[str, str]:
    """{metric: node} of the requested metrics that `network` computes."""
    return {m: METRIC_NODES[m][1] for m in metrics if m in METRIC_NODES and METRIC_NODES[m][0] == network}


@dataclass
class FeatureNet:
    """One network cut at its feature nodes. `module(x)` returns {node: tensor} for normalised input x."""

    name: str
    module: nn.Module
    nodes: dict[str, str]  # metric -> node
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    own_size: int  # the network's own input side (CLIP's is fixed by its position embeddings)
    source: str  # where the weights came from
    device: str = "cpu"

    def to(self, device: str) -> FeatureNet:
        self.module.to(device).eval()
        self.device = device
        return self

    @torch.no_grad()
    def features(
        self, images: Sequence[torch.Tensor], size: int, resampling: str = "bilinear"
    ) -> dict[str, np.ndarray]:
        """{metric: (B, D) float32} for B float images (3, H, W) in [0, 1], each resized to size²
        (`image_metrics.resize` with `resampling`)."""
        x = torch.stack([resize(image, size, resampling) for image in images]).to(self.device, torch.float32)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        out = self.module((x - mean) / std)
        return {metric: out[node].flatten(1).float().cpu().numpy() for metric, node in self.nodes.items()}


def _cut(model: nn.Module, nodes: dict[str, str]) -> nn.Module:
    from torchvision.models.feature_extraction import create_feature_extractor

    with warnings.catch_warnings():  # Inception's train and eval graphs differ (aux logits); we run eval only
        warnings.simplefilter("ignore", UserWarning)
        return create_feature_extractor(model.eval(), return_nodes=sorted(set(nodes.values())))


def checkpoints_dir() -> Path:
    """torchvision's weight cache: $TORCH_HOME/hub/checkpoints (torch.hub.get_dir(), read at call time)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_weights(network: str):
    import torchvision.models

    _, enum, _ = _TORCHVISION[network]
    return getattr(torchvision.models, enum).IMAGENET1K_V1


def weights_file(network: str, weights_dir: str | Path | None = None) -> Path:
    """Where a network's weights are looked for: <weights_dir or torchvision's cache>/<file name>."""
    name = SWAV_FILE if network == "swav" else Path(urlparse(torchvision_weights(network).url).path).name
    return (Path(weights_dir) if weights_dir else checkpoints_dir()) / name


def _load_state_dict(path: Path, network: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: torch raises many kinds
        raise BadInputError(path, f"expected the {network} weights (a torch state dict); cannot load ({err})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint around the weights
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise BadInputError(path, f"expected the {network} weights (a dict of tensors)")
    return state


def load_torchvision(network: str, metrics: dict[str, str], weights_dir: str | Path | None = None) -> FeatureNet:
    """A torchvision network (alexnet, inceptionv3, effnet) from its cache file, cut at `metrics`' nodes."""
    import torchvision.models

    builder, _, kwargs = _TORCHVISION[network]
    weights = torchvision_weights(network)
    path = weights_file(network, weights_dir)
    if not path.is_file():
        where = "--weights-dir" if weights_dir else "$TORCH_HOME/hub/checkpoints (or pass --weights-dir)"
        raise NetworkUnavailable(network, path, f"download {weights.url} into {where}")
    model = getattr(torchvision.models, builder)(weights=None, **kwargs)
    try:
        model.load_state_dict(_load_state_dict(path, network))
    except RuntimeError as err:  # missing/unexpected keys or wrong shapes
        detail = " ".join(str(err).split())[:200]
        raise BadInputError(path, f"not the state dict of torchvision's {builder} ({detail})") from None
    if network == "inceptionv3":  # as torchvision does after loading: the aux head only runs in training
        model.aux_logits, model.AuxLogits = False, None
    return FeatureNet(network, _cut(model, metrics), metrics, IMAGENET_MEAN, IMAGENET_STD, OWN_SIZES[network],
                      str(path))  # fmt: skip


def load_swav(metrics: dict[str, str], path: str | Path | None = None, weights_dir: str | Path | None = None):
    """SwAV ResNet-50: torchvision's resnet50 with SwAV's state dict (see the module docstring)."""
    import torchvision.models

    path = Path(path) if path else weights_file("swav", weights_dir)
    if not path.is_file():
        raise NetworkUnavailable(
            "swav", path, f"download {SWAV_URL} (facebookresearch/swav's ResNet-50, 800 epochs) and pass it with "
            "--swav-weights FILE (or put it in $TORCH_HOME/hub/checkpoints or --weights-dir)",
        )  # fmt: skip
    state = {k.removeprefix("module."): v for k, v in _load_state_dict(path, "swav").items()}
    state = {k: v for k, v in state.items() if not k.startswith(("projection_head.", "prototypes."))}
    model = torchvision.models.resnet50(weights=None)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # wrong shapes
        raise BadInputError(path, f"not a ResNet-50 state dict ({' '.join(str(err).split())[:200]})") from None
    if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
        bad = (sorted(unexpected) or sorted(set(missing) - {"fc.weight", "fc.bias"}))[:3]
        raise BadInputError(path, f"not SwAV's ResNet-50 state dict (keys {', '.join(bad)} ... do not fit resnet50)")
    return FeatureNet("swav", _cut(model, metrics), metrics, IMAGENET_MEAN, IMAGENET_STD, OWN_SIZES["swav"], str(path))


class _ClipImageEmbeds(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image_embeds": self.model(pixel_values=pixel_values).image_embeds}


def load_clip(metrics: dict[str, str], model: str = DEFAULT_CLIP) -> FeatureNet:
    """CLIP's projected image embedding (`image_embeds`) from a local folder or a hub id in the HF cache."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    folder = Path(model)
    if not folder.exists():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(model, local_files_only=True))
        except Exception:  # not in the cache (or not a valid id): nothing is downloaded at run time
            raise NetworkUnavailable(
                "clip", model, f"not a folder and not in the Hugging Face cache; `huggingface-cli download {model}` "
                "or pass --clip-model FOLDER",
            ) from None  # fmt: skip
    try:
        vision = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # transformers raises OSError/ValueError/KeyError for foreign folders
        raise BadInputError(folder, f"expected a CLIP vision model folder ({type(err).__name__})") from None
    try:
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    except Exception:  # a folder without preprocessor_config.json: CLIP's published normalisation
        mean, std = CLIP_MEAN, CLIP_STD
    source = str(folder) if folder == Path(model) else f"{model} ({folder})"
    return FeatureNet("clip", _ClipImageEmbeds(vision.eval()), metrics, mean, std, int(vision.config.image_size),
                      source)  # fmt: skip


def load_networks(
    metrics: Sequence[str], *, weights_dir=None, clip_model: str = DEFAULT_CLIP, swav_weights=None,
    device: str = "cpu",
) -> tuple[dict[str, FeatureNet], dict[str, NetworkUnavailable]]:  # fmt: skip
    """The networks the requested metrics need: ({network: FeatureNet on device}, {network: why not})."""
    nets, missing = {}, {}
    for network in NETWORKS:
        nodes = metrics_of(network, metrics)
        if not nodes:
            continue
        try:
            if network == "clip":
                net = load_clip(nodes, clip_model)
            elif network == "swav":
                net = load_swav(nodes, swav_weights, weights_dir)
            else:
                net = load_torchvision(network, nodes, weights_dir)
        except NetworkUnavailable as err:
            missing[network] = err
            continue
        nets[network] = net.to(device)
    return nets, missing


__all__ = [
    "DEFAULT_CLIP",
    "METRIC_NODES",
    "NETWORKS",
    "SWAV_FILE",
    "SWAV_URL",
    "FeatureNet",
    "NetworkUnavailable",
    "checkpoints_dir",
    "load_clip",
    "load_networks",
    "load_swav",
    "load_torchvision",
    "metrics_of",
    "network_of",
    "torchvision_weights",
    "weights_file",
]
