"""Class-conditional stage 2 on ``shapes``, judged by the shapes generator's own rule.

The product path, shortened: ``train.py`` trains a VQ model of the label maps of single-object
shapes (``data.target=segmentation data.max_objects=1``), then ``train.py stage=transformer
conditioning=class`` a tiny GPT on its codes; the GPT samples maps of each requested class, and the
generator's rule for ``class_label`` (the shape class of the object with the most visible pixels)
reads the class off each decoded map.

Label maps, not RGB images: at a CI budget (minutes on two CPU cores) a tiny RGB VQGAN's codes of
the same images are too noisy for a tiny GPT to learn the shapes (in trials: a classifier that
scores 0.92 on the VQGAN's reconstructions put 0.21 of 48 class-conditional samples in the requested
class, chance 0.17), while the label-map codes are learnt in the same budget. The subject here is
the transformer's class conditioning (class tokens, label dropout, guidance, sampling), which is
the same for either first stage.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset

from tests.conftest import run_train
from vqtransformer.data.shapes import SHAPE_CLASSES, ShapesDataset
from vqtransformer.evaluation.generative import transformer_nll
from vqtransformer.loading import load_stage

DATA = ["data=shapes", "data.max_objects=1", "data.object_scale=[0.3,0.45]", "data.resolution=32",
        "data.batch_size=16", "data.val_size=32", "trainer.val_batches=1", "trainer.log_every=50", "logger=none"]
MAP_VQ = ["data.target=segmentation", "first_stage.learning_rate=1e-3", "trainer.max_steps=400",
          "trainer.val_every=400", "trainer.ckpt_every=400"]
GPT = ["stage=transformer", "conditioning=class", "conditioning.p_uncond=0.1", "transformer.block_size=64",
       "transformer.lr=1e-3", "transformer.warmup_steps=50", "trainer.max_steps=1200", "trainer.val_every=1200",
       "trainer.ckpt_every=1200", "stage.val_samples=2"]
N_PER_CLASS = 8


def shown_class(labels: torch.Tensor) -> torch.Tensor:
    """The generator's ``class_label`` rule on label maps [B, H, W] (0 = background, 1 + class):
    the class with the most pixels; -1 where no object was drawn."""
    counts = torch.stack([(labels == k + 1).sum((1, 2)) for k in range(len(SHAPE_CLASSES))], 1)
    return torch.where(counts.sum(1) > 0, counts.argmax(1), -1)


def test_class_conditional_samples_show_the_requested_shape(tmp_path):
    vq_dir, gpt_dir = tmp_path / "map-vq", tmp_path / "gpt"
    env = {"OMP_NUM_THREADS": "2"}
    r = run_train(DATA + MAP_VQ + [f"hydra.run.dir={vq_dir}"], cwd=tmp_path, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train(DATA + GPT + [f"first_stage.ckpt={vq_dir / 'checkpoints' / 'last.ckpt'}",
                                f"hydra.run.dir={gpt_dir}"], cwd=tmp_path, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]

    stage = load_stage(gpt_dir / "checkpoints" / "last.ckpt").stage
    assert stage.image_key == "segmentation"  # a prior over the label-map codes
    vq = stage.first_stage
    held_out = ShapesDataset("test", 32, 256, max_objects=1, object_scale=(0.3, 0.45))
    maps = torch.stack([held_out[i]["segmentation"] for i in range(len(held_out))])
    labels = torch.stack([held_out[i]["class_label"] for i in range(len(held_out))])
    assert torch.equal(shown_class(maps), labels)  # the rule is the generator's
    with torch.no_grad():
        rec = vq.decode_indices(vq.encode_to_indices(stage.first_stage_input(maps))).argmax(1)
    rec_acc = (shown_class(rec) == labels).float().mean().item()
    assert rec_acc >= 0.8, f"the map VQ model loses the class: {rec_acc:.2f} of held-out maps keep it"

    # evaluate.py's class information: a wrong class must explain the maps clearly worse than the true one
    loader = DataLoader(Subset(held_out, range(64)), batch_size=32)
    info = transformer_nll(stage, loader, torch.device("cpu"), 32 * 32)["class_information"]
    assert info > 0.5, f"the GPT takes {info:.3f} nats per map from its class"

    requested = torch.arange(len(SHAPE_CLASSES)).repeat_interleave(N_PER_CLASS)
    codes = stage.sample_codes(len(requested), requested, seed=0, cfg_scale=2.0)
    with torch.no_grad():
        shown = shown_class(vq.decode_indices(codes).argmax(1))
    per_class = [(shown[requested == k] == k).float().mean().item() for k in range(len(SHAPE_CLASSES))]
    report = ", ".join(f"{name} {acc:.2f}" for name, acc in zip(SHAPE_CLASSES, per_class))
    accuracy = (shown == requested).float().mean().item()
    print(f"map VQ keeps the class of {rec_acc:.3f} of held-out maps; class information {info:.3f} nats per map; "
          f"samples show the requested class: "
          f"{accuracy:.3f} ({report})")
    # chance is 1/6: most samples must show the requested class, and every class more often than chance
    assert accuracy >= 0.6, f"samples show the requested class {accuracy:.2f} of the time ({report})"
    assert min(per_class) > 1 / len(SHAPE_CLASSES), report
    # and sampling images works on such a prior: colourised maps
    images = stage.sample(2, [0, 1], seed=0)
    assert images.shape == (2, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
