"""Test-wide settings: one torch thread (tiny models on a shared 2-core CI machine run many times faster), no
network for the Hub or datasets, and transformers' slow common tests switched on."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# transformers' common tests (tests/hf_common) mark some `@slow` and run them only under RUN_SLOW: run them, as our own.
os.environ.setdefault("RUN_SLOW", "1")
# An unset `mixed_precision` is what `accelerate launch` asks for through this variable: the runs' own settings only.
os.environ.pop("ACCELERATE_MIXED_PRECISION", None)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Back to one thread before each test: code under test may change it (the training loop's `torch_threads`,
    the benchmark's `--threads`)."""
    torch.set_num_threads(1)


@pytest.fixture
def unusual_permissions():
    """`check(folder)`: what under `folder` (the folder itself excluded) has other permissions than a plain `open` or
    `mkdir` gives under the current umask; safetensors and mkstemp/mkdtemp make private files and folders."""
    umask = os.umask(0)
    os.umask(umask)

    def check(folder):
        return [f"{path.relative_to(folder)} {oct(path.stat().st_mode & 0o777)}" for path in folder.rglob("*")
                if path.stat().st_mode & 0o777 != (0o777 if path.is_dir() else 0o666) & ~umask]

    return check
