"""LPIPS perceptual loss (Zhang et al. 2018) through the ``lpips`` package, with explicit weights.

LPIPS needs two things: its linear calibration layers (shipped inside the ``lpips``
package) and an ImageNet-trained torchvision backbone (VGG16 for VQGAN), which
torchvision downloads on first use into ``$TORCH_HOME/hub/checkpoints``. On a machine
without network the backbone must already be there or be given as a file
(``...loss.lpips_weights=PATH``); otherwise we stop before training with a message that
says so — never a silent fallback. ``random_backbone=True`` builds a randomly
initialised backbone, for tests and timing only (it is logged with the run).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

BACKBONE_FILES = {
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "squeeze": ("squeezenet1_1-b8a52dc0.pth", "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"),
}


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached nor downloadable; the message says what to set."""


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _fetch_backbone(net: str, weights: str | None, key: str) -> dict[str, torch.Tensor]:
    if net not in BACKBONE_FILES:
        raise ValueError(f"{key.rsplit('.', 1)[0]}.lpips_net must be one of {sorted(BACKBONE_FILES)}, got '{net}'")
    filename, url = BACKBONE_FILES[net]
    path = Path(weights).expanduser() if weights else hub_checkpoint_dir() / filename
    if not path.is_file() and not weights and os.environ.get("VQT_OFFLINE", "0") != "1":
        try:  # first use on a machine with network: torchvision's own download into the hub cache
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except Exception:  # noqa: BLE001 - any network failure means "not available"
            pass
    if not path.is_file():
        raise WeightsUnavailableError(
            f"LPIPS needs the ImageNet weights of torchvision's {net} backbone, file '{filename}', which is not in "
            f"the torch hub cache '{hub_checkpoint_dir()}' (TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')}) "
            f"and could not be downloaded from {url}. Copy the file there, or set {key}=/path/to/{filename}, "
            f"or turn the perceptual loss off with {key.rsplit('.', 1)[0]}.perceptual=none.")
    return torch.load(path, map_location="cpu", weights_only=True)


def build_lpips(net: str = "vgg", weights: str | None = None, random_backbone: bool = False,
                key: str = "first_stage.loss.lpips_weights") -> nn.Module:
    """A frozen ``lpips.LPIPS`` in eval mode; ``forward(x, y)`` with x, y in [-1, 1] gives [B,1,1,1]."""
    import lpips

    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if not random_backbone:
        tv_state = _fetch_backbone(net, weights, key)
        # lpips keeps torchvision's feature modules in slices with their original indices:
        # net.sliceK.X.weight <- features.X.weight
        own = model.net.state_dict()
        mapped = {}
        for name in own:
            _, idx, param = name.split(".", 2)
            src = f"features.{idx}.{param}"
            if src not in tv_state:
                raise WeightsUnavailableError(f"LPIPS backbone file for '{net}' lacks '{src}': wrong file for {key}?")
            mapped[name] = tv_state[src]
        model.net.load_state_dict(mapped)
    model.eval().requires_grad_(False)
    return model
