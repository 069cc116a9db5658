import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)  # small models: one intra-op thread is fastest and avoids oversubscription


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
