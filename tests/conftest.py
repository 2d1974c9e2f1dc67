import os
from pathlib import Path

# Ray reads this when it is imported: every worker line reaches the driver as it is, not merged
# into "[repeated 2x across cluster]" (the multi-node test reads them)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(
    os.environ.get(
        "SPECIALISTS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"
    )
)

# Tiny, fast defaults shared by the tests: 12 classes in 3 groups of 4, 16x16 images.
TINY_DATA = "embedded:n_classes=12,n_groups=3,image_size=16,train_per_class=40,val_per_class=10,test_per_class=10"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _decode_cache(tmp_path_factory):
    """Decoded image folders go to a temporary cache, never the user's ~/.cache."""
    os.environ["SPECIALISTS_CACHE"] = str(tmp_path_factory.mktemp("decode-cache"))
    yield
