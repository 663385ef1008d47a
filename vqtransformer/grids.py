"""Image grids for MLflow and sample files: rows of image batches, each tile upscaled (nearest) to at
least ``MIN_TILE`` pixels so that 32-px images can be seen in the MLflow UI."""

from __future__ import annotations

import math

import torch

MIN_TILE = 128


def upscale(x: torch.Tensor, min_size: int = MIN_TILE) -> torch.Tensor:
    """Nearest-neighbour upscaling by the smallest integer factor that makes the shorter side >= ``min_size``."""
    factor = max(1, math.ceil(min_size / min(x.shape[-2:])))
    return x if factor == 1 else x.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


def image_grid(rows: list[torch.Tensor], max_cols: int | None = None, min_size: int = MIN_TILE) -> torch.Tensor:
    """Rows of image batches in [-1, 1] -> one [3, H, W] grid in [0, 1] (row i = batch i).

    Every row shows the same number of images (the shortest row's, at most ``max_cols``);
    1-channel rows are shown in grey.
    """
    from torchvision.utils import make_grid

    n = min(r.shape[0] for r in rows)
    if max_cols:
        n = min(n, max_cols)
    tiles = [r[:n].detach().float().cpu().clamp(-1, 1).add(1).div(2) for r in rows]
    tiles = [t.repeat(1, 3, 1, 1) if t.shape[1] == 1 else t for t in tiles]
    return make_grid(upscale(torch.cat(tiles), min_size), nrow=n, padding=2, pad_value=1.0)


def square_grid(x: torch.Tensor, nrow: int | None = None, min_size: int = MIN_TILE) -> torch.Tensor:
    """One batch in [-1, 1] as a grid of ``nrow`` images per row (default: about square)."""
    nrow = nrow or max(1, math.ceil(math.sqrt(x.shape[0])))
    rows = [x[i:i + nrow] for i in range(0, x.shape[0], nrow)]
    if rows and rows[-1].shape[0] < nrow:  # pad the last row with white tiles
        pad = torch.ones((nrow - rows[-1].shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        rows[-1] = torch.cat([rows[-1], pad])
    return image_grid(rows, min_size=min_size)


def labelled_grid(rows: list[torch.Tensor], labels: list[str], min_size: int = MIN_TILE) -> torch.Tensor:
    """:func:`image_grid` with ``labels[i]`` written under row i (e.g. the prompt of a row of samples)."""
    import numpy as np
    from PIL import Image, ImageDraw

    if len(labels) != len(rows):
        raise ValueError(f"{len(labels)} labels for {len(rows)} rows")
    grid = image_grid(rows, min_size=min_size)
    tile_h = (grid.shape[1] - 2) // len(rows)  # make_grid: padding 2 around and between tiles
    strip = 14
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    out = Image.new("RGB", (arr.shape[1], arr.shape[0] + strip * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(labels):
        top = i * (tile_h + strip)
        out.paste(Image.fromarray(arr[i * tile_h:(i + 1) * tile_h + 2]), (0, top))
        draw.text((4, top + tile_h + 2), text, fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(out)).permute(2, 0, 1).float().div(255)
