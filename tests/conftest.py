import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py and friends
sys.path.insert(0, str(Path(__file__).parent / "netguard"))  # the network guard plugin

import torch  # noqa: E402

# The tests run many tiny linear-algebra calls, where OpenMP threads only add overhead (and, on a busy
# 2-core machine, stall: a 10 x 4 QR took 11 ms with 2 threads and 6 us with one).
torch.set_num_threads(1)


import pytest  # noqa: E402

# pytest_netguard: any socket connection outside the loopback fails the test that tried it, in this process and
# in the child processes tests start (see tests/netguard/).
pytest_plugins = ["pytester", "pytest_netguard"]


@pytest.fixture(scope="session", autouse=True)
def offline_cache(tmp_path_factory):
    """Every test sees a fresh cache root (``$GOLORE_LAB_CACHE``, inherited by child processes) holding the two
    fine-tuning tasks prepared from small archives shaped like the real ones: nothing is fetched, and nothing
    from the user's own cache is read."""
    from lm_helpers import prepare_fixture_tasks

    root = tmp_path_factory.mktemp("golore_lab_cache")
    prepare_fixture_tasks(root, tmp_path_factory.mktemp("archives"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GOLORE_LAB_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    """A prepared LM corpus built from the committed real-text fixture (no network)."""
    from lm_helpers import build_fixture_corpus

    root = tmp_path_factory.mktemp("cache")
    build_fixture_corpus(root)
    return root


@pytest.fixture(scope="module")
def task(corpus_root):
    """The pre-training task on the fixture corpus with the tiny LLaMA."""
    from golore_lab.lm.data import load_corpus
    from golore_lab.lm.model import LlamaConfig
    from golore_lab.lm.pretrain import LMTask

    corpus = load_corpus(next(corpus_root.glob("corpus-*")))
    return LMTask(corpus, LlamaConfig.preset("tiny"), seq_len=32, eval_windows=8)
