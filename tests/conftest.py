"""Shared fixtures: float64 mode and the location of the shared data and parity folders."""

from pathlib import Path

import jax
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
PARITY = SHARED / "parity"


@pytest.fixture
def x64():
    """Run the test body with 64-bit floats enabled (references are float64)."""
    with jax.enable_x64(True):
        yield


def need(path: Path) -> Path:
    """Skip the calling test with a clear reason when a shared file or folder is absent."""
    if not path.exists():
        pytest.skip(f"needs {path} (the shared data folder beside the checkout), which is absent")
    return path
