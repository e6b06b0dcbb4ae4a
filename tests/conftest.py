"""Shared fixtures: float64 mode and the location of the shared data and parity folders."""

import json
from pathlib import Path

import jax
import numpy as np
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


@pytest.fixture
def golden():
    """The parity case computed with the authors' code: images, posteriors, golden values, L."""
    folder = need(PARITY / "xmetric_golden")
    images = np.load(folder / "images.npy")
    labels = np.load(folder / "labels.npy")
    with open(folder / "golden.json") as f:
        values = json.load(f)
    # The parity case's posteriors: one-hot labels, 0.7 one-hot + 0.3 uniform, and uniform.
    k = int(labels.max()) + 1
    onehot = np.eye(k)[labels]
    posteriors = {"onehot": onehot, "soft": 0.7 * onehot + 0.3 / k, "uniform": np.full_like(onehot, 1 / k)}
    bins = int(round((images[0].max() - images[0].min()) / values["onehot"]["per_image"][0]["bin_width"]))
    return images, posteriors, values, bins
