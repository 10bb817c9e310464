from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    """The generated tiny Llama (weights + tokenizer), built once per cache folder."""
    from cluster.embedded_model import ensure_embedded_model

    return ensure_embedded_model()
