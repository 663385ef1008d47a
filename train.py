"""Train a stage: `python train.py stage=vqgan data=faceshq` (Hydra; see README and `--help`)."""

import sys

import hydra
from omegaconf import DictConfig

import vqtransformer.config  # noqa: F401  (registers the config resolvers)
import vqtransformer.tracking.sweep  # noqa: F401  (the sweep callback's ${vqt.on_rank_zero:} resolver)
from vqtransformer.cli import run_or_exit


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from vqtransformer.training.loop import run_training

    metrics = run_or_exit(run_training, cfg, name="train", reraise=HydraConfig.get().mode == RunMode.MULTIRUN)
    return metrics.get("val/loss", None) if metrics else None


def _quiet_non_zero_ranks() -> None:
    """Under torchrun / accelerate launch only global rank 0 writes Hydra's outputs and logs."""
    import os

    if int(os.environ.get("RANK", "0")) > 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
                     "hydra.run.dir=."]


if __name__ == "__main__":
    _quiet_non_zero_ranks()
    main()
