"""Sample from a trained generator (stage=transformer, vqdiffusion or vitgan), or a taming-transformers
Net2NetTransformer with its project YAML:

    python sample.py run_id=ID n=64 [top_k=100 top_p=0.9 temperature=1.0 cfg_scale=3 class_label=2]
    python sample.py ckpt=taming/last.ckpt taming_config=taming/configs/..-project.yaml n=16 [data=... for maps]
    python sample.py run_id=ID steps=25 truncation_rate=0.86 cfg_scale=3 sampler=purity   # vqdiffusion
    python sample.py ckpt=outputs/.../checkpoints/last.ckpt grid=[16,32]    # larger: sliding window
    python sample.py run_id=ID half=true                                     # complete validation images
    python sample.py run_id=ID init_image=in.png 'mask=[8,8,24,24]' [prompt="..."] n=8  # inpaint (vqdiffusion)

The stage comes from :func:`vqtransformer.loading.load_stage`; its sampling options, conditions and
capabilities from the Stage interface. Writes ``grid.png`` and one PNG per sample to ``<run dir>/samples/<time>/`` (or ``out_dir``) and logs
them to the run in MLflow (artifact path ``samples/<time>``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import vqtransformer.config  # noqa: F401  (registers the config resolvers)
from vqtransformer.cli import run_or_exit

log = logging.getLogger("sample")


def log_samples_to_mlflow(run_id: str, directory: Path, artifact_path: str, tracking_uri: str | None) -> None:
    """The one MLflow call of sampling: upload ``directory`` to the run's artifacts (retried, never fatal)."""
    from vqtransformer.tracking import get_client
    from vqtransformer.tracking.mlflow_tracker import with_retries

    client = get_client(tracking_uri)
    with_retries(lambda: client.log_artifacts(run_id, str(directory), artifact_path), "logging samples")


def _run_dir(ckpt: Path, run_id: str | None, tracking_uri: str | None) -> Path:
    if run_id:
        from vqtransformer.tracking import get_client

        try:
            tagged = get_client(tracking_uri).get_run(run_id).data.tags.get("vqt.output_dir")
            if tagged and Path(tagged).is_dir():
                return Path(tagged)
        except Exception:  # noqa: BLE001 - the checkpoint's directory will do
            pass
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def run(cfg: DictConfig) -> Path:
    import torch
    from torch.utils.data import default_collate
    from torchvision.utils import save_image

    from vqtransformer.config import ConfigError
    from vqtransformer.grids import image_grid, square_grid
    from vqtransformer.loading import load_stage

    if not cfg.run_id and not cfg.ckpt:
        raise ConfigError("give run_id=ID (an MLflow run of a generator) or ckpt=PATH")
    if cfg.n < 1 or cfg.batch_size < 1:
        raise ConfigError(f"n={cfg.n} and batch_size={cfg.batch_size} must be >= 1")
    if cfg.grid is not None and len(cfg.grid) != 2:
        raise ConfigError(f"grid={list(cfg.grid)} must be [h, w] in codes")
    inpaint = _read_inpainting(cfg)  # the image and its pixel mask, read before the model is
    if cfg.tracking_uri:  # the first stage may be a run id too
        os.environ["MLFLOW_TRACKING_URI"] = cfg.tracking_uri
    data = cfg.get("data")
    overrides = {"data": data} if data is not None else {}
    if cfg.get("text_encoder_path"):  # a CLIP directory that moved since training
        overrides["text_encoder.path"] = str(cfg.text_encoder_path)
    loaded = load_stage(cfg.ckpt or None, cfg.run_id, cfg.get("taming_config"), overrides or None, cfg.tracking_uri)
    stage, path = loaded.stage, loaded.path
    if cfg.get("text_encoder_path") and OmegaConf.select(loaded.config, "text_encoder.kind") != "clip":
        raise ConfigError(f"text_encoder_path={cfg.text_encoder_path} is for text_encoder=clip models; {path} has "
                          f"text_encoder={OmegaConf.select(loaded.config, 'text_encoder.kind')}")
    caps = stage.capabilities
    if "sample" not in caps:
        raise ConfigError(f"{path} is a stage={stage.name} checkpoint, which is not a generator; sample.py samples "
                          "generators (score a first stage with evaluate.py)")
    if (cfg.grid is not None and "larger_grid" not in caps) or (cfg.half and "complete" not in caps):
        raise ConfigError(f"grid= and half= are for models with sliding-window sampling and half-image completion; "
                          f"this stage={stage.name} model has neither")
    if inpaint is not None and "inpaint" not in caps:
        raise ConfigError(f"init_image= / mask= need a model with the 'inpaint' capability; this stage={stage.name} "
                          "model does not have it")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    stage.to(device)
    cond_type = stage.condition_type
    if cfg.class_label is not None and cond_type != "class":
        raise ConfigError(f"class_label={cfg.class_label}, but this model was trained with conditioning.type={cond_type}")
    prompts = _prompts(cfg)
    if prompts and cond_type != "text":
        raise ConfigError(f"prompt= / prompts_file= are for text-conditional models; this one was trained with "
                          f"conditioning.type={cond_type}")
    run_id = cfg.run_id or loaded.mlflow_run_id
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    out_dir = Path(cfg.out_dir) if cfg.out_dir else _run_dir(path, run_id, cfg.tracking_uri) / "samples" / stamp
    params = {k: cfg[k] for k in stage.sampling_options if cfg.get(k) is not None}  # null: the run's defaults
    if params.get("grid") is not None:
        params["grid"] = tuple(params["grid"])
    if inpaint is not None:  # the masked region of init_image regenerated, n times (per prompt)
        return _sample_inpainting(stage, inpaint, int(loaded.config.data.resolution), prompts, cfg, params, out_dir,
                                  run_id)
    if prompts:  # n samples per prompt, a grid row per prompt with the prompt under it
        return _sample_prompts(stage, prompts, cfg, params, out_dir, run_id)
    val = None
    if cfg.half or stage.condition_needs_data:
        from vqtransformer.data import build_dataset

        val = build_dataset(loaded.config.data, False)

    images, inputs = [], []
    for k, start in enumerate(range(0, cfg.n, cfg.batch_size)):
        b = min(cfg.batch_size, cfg.n - start)
        condition, kw = None, {}
        if cond_type == "class":
            n_cls = stage.num_classes
            condition = [cfg.class_label] * b if cfg.class_label is not None else \
                [i % n_cls for i in range(start, start + b)]
        if val is not None:
            batch = default_collate([val[i % len(val)] for i in range(start, start + b)])
            batch = {key: v.to(device) if torch.is_tensor(v) else v for key, v in batch.items()}
            if stage.condition_needs_data:
                condition = stage.condition_from_batch(batch)
            if cfg.half:
                kw = {"complete": batch}
                inputs.append(batch["image"].cpu())
        x = stage.sample(b, condition, seed=int(cfg.seed) + k, **kw, **params)
        images.append(x.cpu())
        log.info("sampled %d/%d", start + b, cfg.n)
    samples = torch.cat(images)
    x = samples.add(1).div(2).clamp(0, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    # class-balanced samples: one row per class (sample i has class i % C); else about square
    n_cls = stage.num_classes if cond_type == "class" and cfg.class_label is None else 0
    if n_cls and cfg.n >= n_cls:
        grid = image_grid([samples[c::n_cls] for c in range(n_cls)])
    else:
        grid = square_grid(samples, max(1, int(round(cfg.n ** 0.5))))
    save_image(grid, out_dir / "grid.png")  # tiles upscaled (nearest) to >= 128 px
    if inputs:
        save_image(image_grid([torch.cat(inputs), samples]), out_dir / "inputs_and_completions.png")
    if cfg.singles:
        for i, img in enumerate(x):
            save_image(img, out_dir / f"sample_{i:05d}.png")
    print(f"[vqtransformer] {cfg.n} samples in {out_dir}", flush=True)
    if run_id:
        log_samples_to_mlflow(run_id, out_dir, f"samples/{out_dir.name}", cfg.tracking_uri)
    return out_dir


def _prompts(cfg: DictConfig) -> list[str]:
    from vqtransformer.config import ConfigError

    if cfg.get("prompt") is not None and cfg.get("prompts_file") is not None:
        raise ConfigError("give prompt= or prompts_file=, not both")
    if cfg.get("prompt") is not None:
        return [str(cfg.prompt)]
    if cfg.get("prompts_file") is None:
        return []
    path = Path(cfg.prompts_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"prompts_file={path}: cannot read it as UTF-8 text ({e})") from None
    prompts = [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        raise ConfigError(f"prompts_file={path} has no prompts (one per line)")
    return prompts


def _sample_prompts(stage, prompts: list[str], cfg: DictConfig, params: dict, out_dir: Path, run_id: str | None) -> Path:
    import torch
    from torchvision.utils import save_image

    from vqtransformer.grids import labelled_grid

    rows, k = [], 0
    for prompt in prompts:
        row = []
        for start in range(0, cfg.n, cfg.batch_size):
            b = min(cfg.batch_size, cfg.n - start)
            row.append(stage.sample(b, prompt, seed=int(cfg.seed) + k, **params).cpu())
            k += 1
        rows.append(torch.cat(row))
        log.info("sampled %d of %r", cfg.n, prompt)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_image(labelled_grid(rows, prompts), out_dir / "grid.png")
    (out_dir / "prompts.txt").write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    if cfg.singles:
        for p_i, row in enumerate(rows):
            for i, img in enumerate(row.add(1).div(2).clamp(0, 1)):
                save_image(img, out_dir / f"sample_p{p_i:03d}_{i:05d}.png")
    print(f"[vqtransformer] {cfg.n} samples of each of {len(prompts)} prompts in {out_dir}", flush=True)
    if run_id:
        log_samples_to_mlflow(run_id, out_dir, f"samples/{out_dir.name}", cfg.tracking_uri)
    return out_dir


def _read_inpainting(cfg: DictConfig):
    """``init_image=`` (RGB) and ``mask=`` (bool [H, W] at the image's size, True = regenerate), or None.

    ``mask``: a PNG of the image's size whose white pixels (grey value >= 128) are regenerated, or a box
    ``[x0, y0, x1, y1]`` in the image's pixels (x0 <= x < x1, y0 <= y < y1)."""
    import numpy as np
    from PIL import Image

    from vqtransformer.config import ConfigError
    from vqtransformer.data.transforms import to_rgb

    init, mask = cfg.get("init_image"), cfg.get("mask")
    if init is None and mask is None:
        return None
    if init is None:
        raise ConfigError("mask= needs init_image=PATH: the image whose masked region is regenerated")
    if mask is None:
        raise ConfigError(f"init_image={init} needs mask=PATH.png (white = regenerate, the image's size) or "
                          "mask=[x0,y0,x1,y1] (a box in the image's pixels)")
    if cfg.half or cfg.grid is not None:
        raise ConfigError("init_image= / mask= inpaint one image at the trained size; drop half= and grid=")

    def read(path, key: str) -> Image.Image:
        try:
            with Image.open(Path(str(path))) as img:
                img.load()
                return img.copy()
        except (OSError, ValueError) as e:  # missing, unreadable, not an image
            raise ConfigError(f"{key}={path}: cannot read it as an image ({e})") from None

    image = to_rgb(read(init, "init_image"))
    W, H = image.size
    if OmegaConf.is_list(mask) or isinstance(mask, (list, tuple)):
        box = list(mask)
        if len(box) != 4 or not all(isinstance(v, int) for v in box):
            raise ConfigError(f"mask={box} must be a box [x0, y0, x1, y1] of 4 integer pixel coordinates")
        x0, y0, x1, y1 = box
        if not (0 <= x0 <= x1 <= W and 0 <= y0 <= y1 <= H):
            raise ConfigError(f"mask={box} must lie in init_image={init} ({W}x{H}): 0 <= x0 <= x1 <= {W}, "
                              f"0 <= y0 <= y1 <= {H} (x1, y1 exclusive)")
        pixels = np.zeros((H, W), dtype=bool)
        pixels[y0:y1, x0:x1] = True
    else:
        png = read(mask, "mask")
        if png.size != (W, H):
            raise ConfigError(f"mask={mask} is {png.size[0]}x{png.size[1]} pixels but init_image={init} is {W}x{H}: "
                              "give a mask of the image's size (or a box mask=[x0,y0,x1,y1])")
        pixels = np.asarray(png.convert("L")) >= 128
    if not pixels.any():
        raise ConfigError(f"mask={mask} is empty (no white pixel, or an empty box): there is nothing to regenerate")
    return image, pixels


def _sample_inpainting(stage, inpaint, resolution: int, prompts: list[str], cfg: DictConfig, params: dict,
                       out_dir: Path, run_id: str | None) -> Path:
    """The masked region of ``init_image`` regenerated n times (per prompt; a text model without a prompt: the
    null caption). Grid rows: the input, the masked input (the regenerated code cells grey), the samples."""
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.utils import save_image

    from vqtransformer.data.transforms import ImageTransform
    from vqtransformer.grids import labelled_grid

    # the image as validation data is (shorter side to data.resolution, bicubic, centre crop); the mask alike,
    # area-resampled so that every pixel it touches stays masked
    pil, pixels = inpaint
    tf = ImageTransform(resolution, train=False)
    image = tf(pil)
    m = tf.resize(Image.fromarray(pixels.astype(np.float32)), Image.BOX)
    x0, y0 = tf.crop_box(*m.size, None)
    mask = torch.from_numpy(np.asarray(m.crop((x0, y0, x0 + resolution, y0 + resolution))) > 0)
    region = stage.inpaint_region(mask).cpu()  # the code tokens it regenerates
    cells = torch.nn.functional.interpolate(region[None, None].float(), size=(resolution, resolution))[0] > 0
    masked = torch.where(cells, torch.zeros_like(image), image)
    log.info("inpainting %d of %d code tokens", int(region.sum()), region.numel())
    cond_type, n_cls, k = stage.condition_type, stage.num_classes, 0
    groups = []
    for prompt in prompts or [None]:  # a text model without prompt: the null caption
        row = []
        for start in range(0, cfg.n, cfg.batch_size):
            b = min(cfg.batch_size, cfg.n - start)
            condition = prompt
            if cond_type == "class":
                condition = [cfg.class_label] * b if cfg.class_label is not None else \
                    [i % n_cls for i in range(start, start + b)]
            row.append(stage.sample(b, condition, seed=int(cfg.seed) + k, inpaint=(image, mask), **params).cpu())
            k += 1
        groups.append(torch.cat(row))
        log.info("inpainted %d%s", cfg.n, f" of {prompt!r}" if prompt else "")
    cols = cfg.n if prompts else max(1, int(round(cfg.n ** 0.5)))
    rows = [r for g in groups for r in g.split(cols)]
    labels = list(prompts) if prompts else ["samples"] + [""] * (len(rows) - 1)

    def pad(x: torch.Tensor) -> torch.Tensor:  # white tiles up to a full row
        return torch.cat([x, torch.ones((cols - x.shape[0], *x.shape[1:]))])

    grid = labelled_grid([pad(image[None]), pad(masked[None])] + [pad(r) for r in rows],
                         ["input", "masked input (grey: regenerated)"] + labels)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_image(grid, out_dir / "grid.png")
    save_image(image.add(1).div(2), out_dir / "input.png")
    save_image(cells.float(), out_dir / "mask.png")  # white: the code cells regenerated
    if prompts:
        (out_dir / "prompts.txt").write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    if cfg.singles:
        for p_i, g in enumerate(groups):
            for i, img in enumerate(g.add(1).div(2).clamp(0, 1)):
                save_image(img, out_dir / (f"sample_p{p_i:03d}_{i:05d}.png" if prompts else f"sample_{i:05d}.png"))
    print(f"[vqtransformer] {cfg.n} inpaintings{f' of each of {len(prompts)} prompts' if prompts else ''} "
          f"in {out_dir}", flush=True)
    if run_id:
        log_samples_to_mlflow(run_id, out_dir, f"samples/{out_dir.name}", cfg.tracking_uri)
    return out_dir


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit(run, cfg, name="sample")


if __name__ == "__main__":
    main()
