import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py and friends

import torch  # noqa: E402

# The tests run many tiny linear-algebra calls, where OpenMP threads only add overhead (and, on a busy
# 2-core machine, stall: a 10 x 4 QR took 11 ms with 2 threads and 6 us with one).
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """Many tiny linear-algebra calls: OpenMP threads only add overhead (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
