"""Fixtures of the taming parity tests (test_vqgan_taming.py, test_convert_taming.py)."""

import pytest
import torch

from tests import taming_original as to


@pytest.fixture(scope="module")
def T():
    """The original taming-transformers modules."""
    return to.taming()


@pytest.fixture(scope="module")
def one_thread_module():
    """Tiny models: one intra-op thread for the whole module (more only spin-wait on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
