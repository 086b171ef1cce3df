import os

import pytest
from lightning.fabric.utilities.distributed import _destroy_dist_connection


@pytest.fixture(autouse=True)
def _clean_distributed_env():
    """Lightning sets MASTER_PORT etc. in the parent during DDP launches; keep tests independent."""
    env = os.environ.copy()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    yield
    _destroy_dist_connection()
    os.environ.clear()
    os.environ.update(env)
