import os

# One thread per process in tests. Tests run servers, torchrun workers and llama.cpp beside
# the test process on a 2-core machine; an oversubscribed 2-thread OpenMP team waits a
# scheduler timeslice at every parallel region (small ops measured ~1000x slower). Set before
# torch is imported so that subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from tests.fixtures import make_model_dir, make_tokenizer


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A French BPE tokenizer (vocab 512) with atomic ChatML markers, no dummy prefix."""
    return make_tokenizer(tmp_path_factory.mktemp("tok_atomic"))


@pytest.fixture(scope="session")
def text_marker_tokenizer(tmp_path_factory):
    """Like the released RODIN tokenizer: ChatML markers are plain text, dummy prefix on."""
    return make_tokenizer(tmp_path_factory.mktemp("tok_text"), atomic_chatml=False, add_dummy_prefix=True)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """A random-weight rodin-debug model directory (base model) with the atomic tokenizer."""
    return make_model_dir(tmp_path_factory.mktemp("model") / "debug", tokenizer)


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, tokenizer):
    """The same, marked as a chat model (carries the ChatML template)."""
    return make_model_dir(tmp_path_factory.mktemp("chat_model") / "debug-chat", tokenizer, chat=True)
