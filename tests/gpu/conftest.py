import gc

import pytest
import torch


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    """Each test's engine goes away before the next test sizes its KV cache."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
