import sys
from pathlib import Path

# tests import their shared tiny-model builders as `from tiny import ...`
sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """Training tests run one intra-op thread: on the shared 2-core box, two threads competing with
    other jobs run ~10x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
