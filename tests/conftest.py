import sys
from pathlib import Path

import pytest
import torch

# tests import their helpers (tiny_models, tiny_tokenizer) as plain modules
sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
