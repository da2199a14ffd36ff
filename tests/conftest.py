import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton kernels run on CPU only through the interpreter, which must be chosen before any
# @triton.jit function is defined (importing torch defines none); with a GPU they run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



def pytest_collection_modifyitems(config, items):
    from freezeasguard.kernels import _triton

    triton = _triton.status()
    no_triton = pytest.mark.skip(reason=f"Triton cannot run here: {triton.reason} (pip install -e \".[triton]\"; "
                                        "on a CPU, TRITON_INTERPRET=1)")
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        elif item.get_closest_marker("triton") and not triton.available:
            item.add_marker(no_triton)


@pytest.fixture
def one_thread():
    """Run a test single-threaded: small ops on a shared 2-core host run many times slower with 2."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
