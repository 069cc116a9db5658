import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)  # small models: one intra-op thread is fastest and avoids oversubscription


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def fmnist():
    from fbnas.space import load_space

    return load_space("fmnist")


@pytest.fixture
def lut_cli(capsys):
    """`fbnas lut <args>` in-process: (exit code, stdout, stderr)."""
    from fbnas.cli import main as cli

    def run(*args):
        code = cli(["lut", *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
