"Shared test set-up: offline hub, one torch thread (tiny models on 2 shared cores), quiet progress bars."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch
torch.set_num_threads(1)

import pytest

# the offline models most test files use, built once per session (a file may still define its own)
@pytest.fixture(scope="session")
def tiny():
    from md_probe.models import load_model
    return load_model("tiny")

@pytest.fixture(scope="session")
def shapes():
    from md_probe.models import load_model
    return load_model("shapes")
