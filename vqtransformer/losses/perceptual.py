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

import torch
import torch.nn as nn

from vqtransformer.weights import WeightsUnavailableError, hub_checkpoint_dir, resolve_weights

__all__ = ["BACKBONE_FILES", "WeightsUnavailableError", "build_lpips", "hub_checkpoint_dir"]

BACKBONE_FILES = {
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "squeeze": ("squeezenet1_1-b8a52dc0.pth", "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"),
}


def _fetch_backbone(net: str, weights: str | None, key: str, download: bool = True,
                    hint: str | None = None) -> dict[str, torch.Tensor]:
    if net not in BACKBONE_FILES:
        raise ValueError(f"{key.rsplit('.', 1)[0]}.lpips_net must be one of {sorted(BACKBONE_FILES)}, got '{net}'")
    filename, url = BACKBONE_FILES[net]
    if hint is None:
        hint = f"Or turn the perceptual loss off with {key.rsplit('.', 1)[0]}.perceptual=none."
    # the one resolver (vqtransformer.weights): explicit file or hub cache, sha256-checked, one offline error
    path = resolve_weights(filename, url, filename.rsplit("-", 1)[1].split(".")[0], weights, key, download,
                           f"LPIPS backbone ({net}) ImageNet weights", hint)
    return torch.load(path, map_location="cpu", weights_only=True)


def build_lpips(net: str = "vgg", weights: str | None = None, random_backbone: bool = False,
                key: str = "first_stage.loss.lpips_weights", download: bool = True,
                hint: str | None = None) -> nn.Module:
    """A frozen ``lpips.LPIPS`` in eval mode; ``forward(x, y)`` with x, y in [-1, 1] gives [B,1,1,1].
    The one LPIPS of the project: the training loss and evaluate.py's metric (``key`` names the config key
    of the backbone file; ``download``/``hint`` as in :func:`vqtransformer.weights.resolve_weights`)."""
    import lpips

    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if not random_backbone:
        tv_state = _fetch_backbone(net, weights, key, download, hint)
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
