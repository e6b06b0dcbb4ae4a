"""The benchmark suite (``experiments/bench``): its measuring tools against hand-counted values,
and its one command in quick mode."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "bench"))
import benchtools  # noqa: E402

from test_experiments import first_number, tables  # noqa: E402


def test_residual_bytes_counts_saved_activations_not_inputs():
    """``sin(p * x)`` summed: its vjp keeps ``cos(p * x)`` (V floats) and ``x`` (an input, not
    counted); ``log`` of the sum then keeps the sum itself (one float)."""
    v = 1000
    x = jnp.linspace(0.0, 1.0, v, dtype=jnp.float32)

    def loss(p, x):
        total = jnp.sum(jnp.sin(p * x))
        return total, total

    assert benchtools.residual_bytes(loss, jnp.ones(v, jnp.float32), x) == 4 * v

    def log_loss(p, x):
        total = jnp.log(jnp.sum(jnp.sin(p * x)) + 2.0)
        return total, None

    assert benchtools.residual_bytes(log_loss, jnp.ones(v, jnp.float32), x) == 4 * v + 4


def test_bandwidth_is_plausible():
    gbs = benchtools.bandwidth_gbs(mib=16, repeats=3)
    assert 0.1 < gbs < 1e5


def test_suite_quick(tmp_path):
    import run

    assert run.main(["--quick", "--out", str(tmp_path)]) == 0
    for part in ("kernels", "groups", "histogram"):
        text = (tmp_path / f"bench_{part}.md").read_text()
        assert "Command: `python experiments/bench/" in text and "--quick" in text
        assert "Machine: " in text and "jaxlib " in text

    kernels = tables((tmp_path / "bench_kernels.md").read_text())[0]
    header, row = kernels[0], kernels[1]
    cell = dict(zip(header, row))
    assert cell["group"] == "2d-3x32"
    for column in ("E-step ms", "X-metric value+grad ms", "compile s", "floor ms"):
        assert first_number(cell[column]) > 0, column
    # Saved activations at a 10% sample: a few tens of bytes per image-voxel at most.
    assert 0 < first_number(cell["saved B / image-voxel"]) < 100

    by_size, by_batch = tables((tmp_path / "bench_groups.md").read_text())[:2]
    assert [(r[0], r[1]) for r in by_size[1:]] == [("2", "X-CoReg"), ("2", "APE")]
    assert all(first_number(r[4]) > 0 for r in by_size[1:])
    assert [r[0] for r in by_batch[1:]] == ["1", "2"]
    # Two groups' program holds at least the first one's inputs twice over.
    plans = [first_number(r[4]) for r in by_batch[1:]]
    assert plans[1] > plans[0]

    histogram = tables((tmp_path / "bench_histogram.md").read_text())[0]
    assert sorted(r[0] for r in histogram[1:]) == ["dense", "onehot", "scatter", "segment"]
    assert min(float(r[2]) for r in histogram[1:]) == pytest.approx(1.0)
    assert np.all([float(r[1]) > 0 for r in histogram[1:]])


def test_device_peak_is_reported_only_where_known():
    peak = benchtools.device_peak_bytes()
    assert peak is None or peak > 0
    if jax.devices()[0].platform == "cpu":
        assert peak is None
