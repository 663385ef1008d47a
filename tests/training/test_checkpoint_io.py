"""The ground-floor checkpoint I/O: Lightning 1.x files (callbacks keyed by ModelCheckpoint, optimizer states,
OmegaConf hyper-parameters) are read as plain data under weights_only; code in a checkpoint is still refused;
weights a model does not have are an error, never silently skipped."""

import os

import pytest
import torch
import torch.nn as nn

from tests import taming_original as to
from vqtransformer.training.checkpoint import CheckpointError, load, load_module_state


def test_lightning_extras_are_read_as_plain_data(tmp_path):
    model = nn.Linear(3, 2)
    ckpt, _ = to.save_released(model, "taming.models.vqgan.VQModel", {"n_embed": 16, "ddconfig": {"ch": 32}},
                               tmp_path, "pl")
    with pytest.raises(Exception, match="Unsupported global"):  # what weights_only alone does with such a file
        torch.load(ckpt, weights_only=True)
    state = load(ckpt)
    assert torch.equal(state["state_dict"]["weight"], model.weight)
    assert state["callbacks"] == {"pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint": {
        "best_model_score": torch.tensor(0.25), "best_model_path": "x.ckpt"}}
    assert state["hyper_parameters"]["cfg"]["model"]["params"] == {"n_embed": 16, "ddconfig": {"ch": 32}}
    assert type(state["hyper_parameters"]) is dict and state["optimizer_states"][0]["param_groups"][0]["lr"] == 4.5e-6


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Execs:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload,name", [(_RunsCode, "posix.system"), (_Execs, "builtins.exec")])
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, payload, name):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "epoch": 1, "x": payload(marker)}, path)
    with pytest.raises(CheckpointError, match=f"is refused: it contains code or objects that are not safe to load "
                                              f"\\({name}\\)"):
        load(path)
    assert not marker.exists()


def test_weights_the_model_does_not_have_are_an_error_even_when_missing_ones_are_allowed():
    model = nn.Sequential(nn.Linear(2, 2))
    state = {**model.state_dict(), "1.weight": torch.zeros(2, 2), "1.bias": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"unexpected in checkpoint \(2, .*'1.weight', '1.bias'.*\n.*"
                                              r"dropped on purpose by the loader: loss.perceptual_loss.\* \(LPIPS\)"):
        load_module_state(model, state, "m", strict=False, dropped={"loss.perceptual_loss.*": "LPIPS"})
    load_module_state(model, {"0.weight": torch.ones(2, 2)}, "m", strict=False)  # missing ones: allowed
    assert torch.equal(model[0].weight, torch.ones(2, 2))
