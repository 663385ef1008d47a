"""First-stage metrics on the real split: rFID, LPIPS, PSNR, SSIM, MS-SSIM, L1 and codebook statistics.

Reconstructions are ``decode_indices(encode_to_indices(x))``, i.e. through the codebook, as the
second stage sees them. Both images are quantised to uint8 first (the protocol), so PSNR / SSIM /
L1 are those of the PNG files, on the [0, 1] scale (data range 1); PSNR and SSIM are averaged per
image. MS-SSIM (5 scales, 11x11 Gaussian) needs images larger than 160 px and is skipped below.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from vqtransformer.evaluation.protocol import EvaluationError, to_uint8, uint8_to_unit

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_KERNEL = 11


def ms_ssim_fits(size: int) -> bool:
    return size > (SSIM_KERNEL - 1) * 2 ** (len(MS_SSIM_BETAS) - 1)


def codebook_stats(counts: torch.Tensor) -> dict[str, float]:
    """Usage (fraction of codes used at least once over the split, in [0, 1] like ``val/codebook_usage``),
    perplexity exp(H(p)) and dead codes."""
    counts = counts.double()
    p = counts / counts.sum().clamp_min(1)
    nz = p[p > 0]
    return {"codebook_usage": float((counts > 0).double().mean()), "perplexity": float(torch.exp(-(nz * nz.log()).sum())),
            "dead_codes": int((counts == 0).sum()), "codebook_size": int(counts.numel())}


def plot_code_histogram(counts: torch.Tensor, path: Path, title: str = "") -> Path:
    """Code frequencies over the split, sorted (left) and by index (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = counts.double().numpy()
    freq = c / max(c.sum(), 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))
    a.bar(range(len(freq)), sorted(freq, reverse=True), width=1.0)
    a.set(yscale="log", xlabel="code rank", ylabel="frequency", title="sorted")
    b.bar(range(len(freq)), freq, width=1.0)
    b.set(xlabel="code index", title=f"{int((c == 0).sum())} of {len(c)} codes unused")
    fig.suptitle(title or "code frequencies")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def ssim_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03) of each image pair,
    averaged over the *valid* window positions as in the reference MATLAB code and scikit-image
    (torchmetrics' mean also counts the reflect-padded border, which we crop)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _, full = structural_similarity_index_measure(y, x, data_range=1.0, kernel_size=SSIM_KERNEL, sigma=1.5,
                                                  reduction="none", return_full_image=True)
    pad = (SSIM_KERNEL - 1) // 2
    return full[..., pad:-pad, pad:-pad].mean(dim=(1, 2, 3))


class PixelMetrics:
    """PSNR / SSIM / MS-SSIM / L1 (torchmetrics; per-image means) on uint8 images."""

    def __init__(self, size: int, metrics: list[str], device: torch.device):
        from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure, PeakSignalNoiseRatio

        self.m: dict[str, object] = {}
        if "psnr" in metrics:
            self.m["psnr"] = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)).to(device)
        if "ms_ssim" in metrics and ms_ssim_fits(size):
            self.m["ms_ssim"] = MultiScaleStructuralSimilarityIndexMeasure(
                data_range=1.0, kernel_size=SSIM_KERNEL, betas=MS_SSIM_BETAS).to(device)
        self.l1, self.ssim = "l1" in metrics, "ssim" in metrics
        self.l1_sum, self.ssim_sum, self.n = 0.0, 0.0, 0

    def update(self, real_u8: torch.Tensor, rec_u8: torch.Tensor) -> None:
        x, y = uint8_to_unit(real_u8), uint8_to_unit(rec_u8)
        for m in self.m.values():
            m.update(y, x)
        if self.ssim:
            self.ssim_sum += float(ssim_per_image(x, y).sum())
        self.l1_sum += float((x - y).abs().mean(dim=(1, 2, 3)).sum())
        self.n += x.shape[0]

    def compute(self) -> dict[str, float]:
        out = {k: float(m.compute()) for k, m in self.m.items()}
        if self.ssim:
            out["ssim"] = self.ssim_sum / self.n
        if self.l1:
            out["l1"] = self.l1_sum / self.n
        return out


@torch.no_grad()
def reconstruct(vqmodel: nn.Module, loader, device: torch.device, metrics: list[str], lpips: nn.Module | None = None,
                feature_net: nn.Module | None = None, total: int | None = None
                ) -> tuple[dict[str, float], torch.Tensor, torch.Tensor | None]:
    """One pass over ``loader``: pixel metrics and LPIPS, code counts, and the feature-network
    features of the reconstructions (for rFID). Returns (metrics, counts [n_embed], features [N, D])."""
    vqmodel = vqmodel.to(device).eval()
    if feature_net is not None:
        feature_net = feature_net.to(device).eval()
    if lpips is not None:
        lpips = lpips.to(device)
    n_embed = int(vqmodel.quantize.n_embed)
    counts = torch.zeros(n_embed, dtype=torch.long, device=device)
    pix, lp_sum, n, feats = None, 0.0, 0, []
    for batch in tqdm(loader, desc="reconstruct", total=total, leave=False):
        x = batch["image"].to(device)
        idx = vqmodel.encode_to_indices(x)
        counts += torch.bincount(idx.flatten(), minlength=n_embed)
        x_u8, rec_u8 = to_uint8(x), to_uint8(vqmodel.decode_indices(idx))
        if pix is None:
            pix = PixelMetrics(x.shape[-1], metrics, device)
        pix.update(x_u8, rec_u8)
        if lpips is not None:
            lp_sum += float(lpips(x_u8.float() / 127.5 - 1, rec_u8.float() / 127.5 - 1).sum())
        if feature_net is not None:
            feats.append(feature_net(rec_u8)[0].float().cpu())
        n += x.shape[0]
    if pix is None:
        raise EvaluationError("reconstruction: the split has no images")
    out = pix.compute()
    if lpips is not None:
        out["lpips"] = lp_sum / n
    return out, counts.cpu(), (torch.cat(feats) if feats else None)
