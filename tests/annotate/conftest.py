"""Annotator tests run their small networks on one thread (restored afterwards).

The test machine is shared; tiny convolutions on an oversubscribed multi-threaded pool run 5-10x slower
than on one thread.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
