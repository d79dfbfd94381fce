import pytest

from hub_server import HubServer


@pytest.fixture
def hub():
    """A fake Hugging Face Hub on 127.0.0.1 (see hub_server.py); `hub.env` points client subprocesses at it."""
    with HubServer() as server:
        yield server
    server.assert_clean()
