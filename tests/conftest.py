import os

import pytest
import torch

from hub_server import HubServer

# `make test` runs two pytest workers on two cores: one thread each (children included) avoids oversubscription,
# which made small ops many times slower here.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def hub():
    """A fake Hugging Face Hub on 127.0.0.1 (see hub_server.py); `hub.env` points client subprocesses at it."""
    with HubServer() as server:
        yield server
    server.assert_clean()
