"""Evaluation under one fixed protocol (``docs/evaluation.md``): :func:`evaluate_stage` scores a loaded
stage and returns a JSON-able summary; ``evaluate.py`` adds checkpoints, MLflow and sweeps.

First stage (``vqgan``): rFID, LPIPS, PSNR, SSIM, MS-SSIM, L1 and codebook usage / perplexity /
dead codes on the real split. Generators: FID, IS, KID of ``eval.num_samples`` samples against
the real split, plus the transformer's validation NLL / bits per dim.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset

from vqtransformer.evaluation import generative, reconstruction, stats_cache
from vqtransformer.evaluation.features import build_feature_network, build_lpips, extract_features
from vqtransformer.evaluation.protocol import (
    DEFAULT_NUM_SAMPLES,
    DEFAULT_NUM_SAMPLES_SHAPES,
    EvaluationError,
    Protocol,
    check_covariance_rank,
    metric_key,
    metrics_for_stage,
    to_uint8,
)
from vqtransformer.weights import WeightsUnavailableError

__all__ = ["EvaluationError", "evaluate_stage", "write_summary", "prepare_stage", "format_table", "Protocol"]

log = logging.getLogger(__name__)

_FEATURE_NEEDS = {"fid", "rfid", "is", "kid"}


def prepare_stage(stage, device: torch.device):
    """Move every module of the stage to ``device`` and switch to eval mode."""
    return stage.to(device).eval()


def eval_data_config(cfg: DictConfig, ev: DictConfig) -> DictConfig:
    """The run's ``data`` config with deterministic loading (no random crop / flip) and ``eval.data`` overrides."""
    data = OmegaConf.merge(cfg.data, {"random_crop": False, "flip": False}, ev.get("data") or {})
    return data


def _loader(dataset, ev: DictConfig, data_cfg: DictConfig) -> DataLoader:
    workers = ev.get("num_workers")
    workers = int(data_cfg.get("num_workers", 0) if workers is None else workers)
    return DataLoader(dataset, batch_size=int(ev.batch_size), shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available())


def _num_classes(cfg: DictConfig, stage, dataset) -> int | None:
    """Classes to balance samples over, when the stage is class-conditional (``Stage.condition_type``)."""
    if stage.condition_type != "class":
        return None
    from vqtransformer.data import num_classes

    n = stage.num_classes or OmegaConf.select(cfg, "data.num_classes") or num_classes(dataset)
    if not n:
        raise EvaluationError("class-conditional stage but the number of classes is unknown; set "
                              "conditioning.num_classes (or data.num_classes)")
    return int(n)


def standin_choice(ev: DictConfig, data_cfg: DictConfig | None = None) -> tuple[str, str]:
    """(feature network, LPIPS backbone) after the offline switch ``eval.standin=true``: Inception becomes
    the labelled stand-in network (the dataset's judge, e.g. ``shapes_judge`` on data=shapes, is kept: it
    needs no download) and the LPIPS backbone the stand-in one. Their numbers are named ``<network>/<metric>``."""
    from vqtransformer.evaluation.features import default_feature_network

    name, lpips_net = str(ev.feature_network), str(ev.get("lpips_net", "alex"))
    if bool(ev.get("standin", False)):
        if name == "auto":
            name = default_feature_network(data_cfg)
        if name == "inception":
            name = "standin"
        lpips_net = "standin"
    return name, lpips_net


def evaluate_stage(stage, cfg: DictConfig, ev: DictConfig, device: torch.device, out_dir: Path) -> dict:
    """Score ``stage`` (built from the run config ``cfg``) under the protocol in ``ev`` (``eval.*``).

    Everything that can fail on bad input (metrics, weights, sample counts) is checked before
    the long passes. Artifacts (the code histogram) go to ``out_dir``; :func:`write_summary` writes the JSON.
    """
    from vqtransformer.data import build_dataset
    from vqtransformer.data.splits import dataset_summary

    stage_name = stage.name
    requested = ev.get("metrics")
    if isinstance(requested, str):
        requested = [requested]
    metrics = metrics_for_stage(stage, list(requested) if requested else None)
    recon = "reconstruct" in stage.capabilities
    if str(cfg.data.get("target", "image")) != "image":
        raise EvaluationError(f"data.target={cfg.data.target}: the protocol scores image models only")
    # weights first: a missing file stops us before any sampling
    data_cfg = eval_data_config(cfg, ev)
    feature_name, lpips_net = standin_choice(ev, data_cfg)
    net = (build_feature_network(feature_name, ev.get("feature_weights"), bool(ev.download), data_cfg)
           if _FEATURE_NEEDS & set(metrics) else None)
    lpips, notes = None, []
    if "lpips" in metrics:
        try:
            lpips = build_lpips(lpips_net, ev.get("lpips_weights"), bool(ev.download))
        except WeightsUnavailableError as e:
            if requested:  # asked for by name: no score without it
                raise
            metrics = [m for m in metrics if m != "lpips"]  # a stage default: the others are still scored
            log.warning("LPIPS skipped: %s", e)
            notes.append(f"lpips skipped (a default metric; its weights are missing: set eval.lpips_weights=PATH): {e}")

    split = str(ev.split)
    if split not in ("train", "val"):
        raise EvaluationError(f"eval.split={split}: choose 'train' or 'val'")
    dataset = build_dataset(data_cfg, split == "train")
    if ev.get("num_real"):
        dataset = Subset(dataset, range(min(int(ev.num_real), len(dataset))))
    n_real, resolution = len(dataset), int(data_cfg.resolution)
    n_samples = n_real if recon else int(ev.num_samples or (
        DEFAULT_NUM_SAMPLES_SHAPES if data_cfg.name == "shapes" else DEFAULT_NUM_SAMPLES))
    protocol = Protocol(split=split, num_samples=n_samples, num_real=n_real, seed=int(ev.seed),
                        feature_network=net.identity if net else "none", is_splits=int(ev.is_splits),
                        kid_subsets=int(ev.kid_subsets), kid_subset_size=int(ev.kid_subset_size))
    if {"fid", "rfid"} & set(metrics):
        checks = [(n_real, f"real images ({split} split)", "Use a larger split (or eval.num_real=null).")]
        if not recon:
            checks.append((n_samples, "generated samples", f"Set eval.num_samples>={net.num_features + 1}."))
        for n, what, fix in checks:
            warning = check_covariance_rank(n, net.num_features, what, str(ev.small_n), fix)
            if warning:
                log.warning(warning)
                notes.append("UNSTABLE FID: " + warning)
    if "is" in metrics and net.num_logits == 0:
        raise EvaluationError(f"eval.metrics asks for 'is' but feature network '{net.name}' has no class logits")

    loader = _loader(dataset, ev, data_cfg)
    values: dict[str, float] = {}
    artifacts: list[str] = []
    real_feats, cache_info = None, None
    if {"fid", "rfid", "kid"} & set(metrics):
        key = stats_cache.stats_key(OmegaConf.to_container(data_cfg, resolve=True), split, resolution, n_real,
                                    net.identity)
        path = stats_cache.stats_path(key)

        def compute():
            return extract_features(net, (to_uint8(b["image"]) for b in loader), device, n_real,
                                    f"real features ({split})")[0]

        real_feats, hit = stats_cache.load_or_compute(key, compute)
        cache_info = {"path": str(path), "hit": hit}
        log.info("real statistics %s: %s", "loaded from" if hit else "computed and cached at", path)

    prepare_stage(stage, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    if recon:
        vq = stage.reconstruction_model()
        pix, counts, rec_feats = reconstruction.reconstruct(
            vq, loader, device, metrics, lpips, net if "rfid" in metrics else None, len(loader))
        values.update(pix)
        if "rfid" in metrics:
            values["rfid"] = generative.fid(real_feats.to(device), rec_feats.to(device))
            if hasattr(net, "classify"):  # a dataset judge: is each reconstruction still what its original shows?
                values["rec_class_agreement"] = rec_class_agreement(net, real_feats, rec_feats)
        if "codebook" in metrics:
            values.update(reconstruction.codebook_stats(counts))
            hist = reconstruction.plot_code_histogram(counts, out_dir / "code_histogram.png",
                                                      f"code frequencies over the {split} split ({n_real} images)")
            artifacts.append(str(hist))
        if "ms_ssim" in metrics and "ms_ssim" not in values:
            notes.append(f"ms_ssim skipped: needs images larger than "
                         f"{(reconstruction.SSIM_KERNEL - 1) * 2 ** (len(reconstruction.MS_SSIM_BETAS) - 1)} px "
                         f"(these are {resolution} px)")
    else:
        if {"fid", "is", "kid"} & set(metrics):
            n_cls = _num_classes(cfg, stage, dataset)
            prompts = eval_prompts(dataset, n_samples) if stage.condition_type == "text" else None
            bs = int(ev.get("sample_batch_size") or ev.batch_size)
            options = sampling_overrides(stage, ev)
            if options:
                notes.append(f"sampled with {', '.join(f'{k}={v}' for k, v in options.items())} (eval.sampling)")
            fake, fake_logits = extract_features(
                net, generative.generate_uint8(stage, n_samples, bs, int(ev.seed), n_cls, prompts, options), device,
                n_samples,
                f"samples{' (class-balanced)' if n_cls else ' (of the split captions)' if prompts else ''}")
            gen, gen_notes = generative.generator_metrics(real_feats, fake, fake_logits, metrics, int(ev.is_splits),
                                                          int(ev.kid_subsets), int(ev.kid_subset_size), int(ev.seed),
                                                          device)
            values.update(gen)
            notes += gen_notes
            if hasattr(net, "classify"):  # a dataset judge: which class does each sample show?
                judged, plot = judge_classes(net, real_feats, fake, n_cls, n_samples, out_dir)
                values.update(judged)
                artifacts.append(str(plot))
            if prompts is not None and hasattr(net, "classify_colour"):  # does each sample show its caption?
                values.update(judge_captions(net, fake, prompts))
        if "nll" in metrics:
            val = dataset if split == "val" else build_dataset(data_cfg, False)
            values.update(generative.transformer_nll(stage, _loader(val, ev, data_cfg), device, resolution * resolution))

    if "lpips" in values and lpips_net == "standin":  # eval/<network>/<metric>, as for the feature network
        values["standin/lpips"] = values.pop("lpips")
        notes.append("LPIPS computed with a stand-in (random) backbone (eval.standin=true or eval.lpips_net=standin): "
                     "plumbing only, not LPIPS")
    return {
        "stage": stage_name,
        "split": {"name": split, **dataset_summary(dataset)},  # which real images were scored
        "feature_network": net.name if net else None,
        "feature_network_identity": net.identity if net else None,
        "comparable_to_published": net is None or net.name == "inception",
        "protocol": protocol.as_dict(), "protocol_id": protocol.id(),
        "metrics": {metric_key(k, net.name if net else "inception"): v for k, v in values.items()},
        "notes": notes, "real_stats": cache_info, "artifacts": artifacts,
    }


def rec_class_agreement(net, real_feats: torch.Tensor, rec_feats: torch.Tensor) -> float:
    """The fraction of reconstructions the judge puts in the class it gives their originals (same
    order: both come from the unshuffled loader). A first stage's ceiling for the class accuracy of
    the generators trained on its codes."""
    return float((net.classify(rec_feats).cpu() == net.classify(real_feats).cpu()).double().mean())


def judge_classes(net, real_feats: torch.Tensor, fake_feats: torch.Tensor, num_classes: int | None, n: int,
                  out_dir: Path) -> tuple[dict[str, float], Path]:
    """Class-conditional: the fraction of samples the judge puts in the requested class (samples are
    drawn class-balanced, :func:`generative.class_balanced_labels`). Unconditional: the smallest and
    largest ratio of a class's sample frequency to its frequency in the real split. Both write the
    class histogram (samples vs real) as a plot."""
    pred_fake = net.classify(fake_feats).cpu()
    pred_real = net.classify(real_feats).cpu()
    k = int(net.num_logits)
    p_fake = torch.bincount(pred_fake, minlength=k).double() / len(pred_fake)
    p_real = torch.bincount(pred_real, minlength=k).double() / len(pred_real)
    out: dict[str, float] = {}
    if num_classes:
        labels = generative.class_balanced_labels(n, num_classes)
        hit = (pred_fake == labels).double()
        out["class_accuracy"] = float(hit.mean())
        for c in range(num_classes):
            out[f"class_accuracy_{c}"] = float(hit[labels == c].mean())
    ratio = p_fake / p_real.clamp_min(1e-12)
    present = p_real > 0
    out["class_freq_min_ratio"] = float(ratio[present].min())
    out["class_freq_max_ratio"] = float(ratio[present].max())
    from vqtransformer.evaluation.judge import plot_class_histogram

    return out, plot_class_histogram(p_real, p_fake, out_dir / "class_histogram.png")


def sampling_overrides(stage, ev: DictConfig) -> dict:
    """``eval.sampling``: sampling options (the stage's ``sampling_options``, e.g. cfg_scale, steps) that
    replace the run's own sampling config for the generated samples; part of the protocol record."""
    given = ev.get("sampling")
    options = dict(OmegaConf.to_container(given, resolve=True)) if given else {}
    unknown = sorted(set(options) - set(stage.sampling_options))
    if unknown:
        raise EvaluationError(f"eval.sampling.{unknown[0]}: stage '{stage.name}' takes sampling options "
                              f"{', '.join(stage.sampling_options) or '(none)'}")
    return options


def eval_prompts(dataset, n: int) -> list[str]:
    """The captions of the scoring split, in order and repeated up to ``n``: what a text-conditional
    model is asked to draw."""
    if len(dataset) == 0 or "caption" not in dataset[0]:
        raise EvaluationError("a text-conditional model is scored on the captions of its data, but this split has none")
    captions = [dataset[i]["caption"] for i in range(min(n, len(dataset)))]
    return [captions[i % len(captions)] for i in range(n)]


def judge_captions(net, fake_feats: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """The fraction of samples whose dominant object the judge gives the shape / the colour / both of
    the object their caption names first (captions in the ``shapes`` grammar; others are not counted)."""
    from vqtransformer.data.captions import COLOUR_NAMES, main_object
    from vqtransformer.data.shapes import SHAPE_CLASSES

    parsed = [main_object(p) for p in prompts]
    keep = torch.tensor([m is not None and m[1] in SHAPE_CLASSES for m in parsed])
    if not keep.any():
        return {}
    shape = torch.tensor([SHAPE_CLASSES.index(m[1]) if k else -1 for m, k in zip(parsed, keep.tolist())])
    colour = torch.tensor([COLOUR_NAMES.index(m[0]) if k else -1 for m, k in zip(parsed, keep.tolist())])
    s_hit = net.classify(fake_feats).cpu() == shape
    c_hit = net.classify_colour(fake_feats).cpu() == colour
    return {"caption_shape_accuracy": float(s_hit[keep].double().mean()),
            "caption_colour_accuracy": float(c_hit[keep].double().mean()),
            "caption_accuracy": float((s_hit & c_hit)[keep].double().mean())}


def write_summary(summary: dict, out_dir: Path) -> Path:
    """``summary.json`` (``summary-<network>.json`` for a non-Inception feature network) in ``out_dir``."""
    net = summary.get("feature_network")
    path = Path(out_dir) / ("summary.json" if net in (None, "inception") else f"summary-{net}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def format_table(summary: dict, title: str = "") -> str:
    """The printed result: one metric per line, with the feature network named."""
    net = summary.get("feature_network")
    rows = [(k, f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in summary["metrics"].items()]
    w = max([len(k) for k, _ in rows] + [6])
    head = [title] if title else []
    head.append(f"stage={summary['stage']}  feature_network={net}  protocol={summary['protocol_id']}")
    if net and net != "inception":
        head.append(f"NOTE: numbers from '{net}' features are not comparable to published (Inception) ones")
    lines = head + [f"  {k:<{w}}  {v}" for k, v in rows] + [f"  ! {n}" for n in summary.get("notes", [])]
    return "\n".join(lines)
