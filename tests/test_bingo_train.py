"""BInGo training: partial/complete batches, loss decrease, exact resume, weight files."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xjax import phantoms
from xjax.intensity import unit_range
from xjax.nn import bingo
from xjax.nn.bingo import train as bingo_train
from xjax.nn.bingo.losses import ElboWeights

# Two levels keep compilation short on a 2-core CPU; the three-level model is tested in
# test_bingo_model.py, and training runs the same code for any number of levels.
CONFIG = bingo.BingoConfig(ndim=2, num_modalities=3, features=(4, 8), latent=2, reg_features=8,
                           decoder_features=(4, 8), svf_steps=4)
TRAIN = bingo_train.TrainConfig(steps=12, learning_rate=3e-3, batch_size=2, scheme="partial",
                                seed=3, weights=ElboWeights(), log_every=1, checkpoint_every=0)


@pytest.fixture(scope="module")
def data():
    """Four misaligned 3-modality phantom groups on a 16 x 16 grid, one modality missing."""
    groups = []
    for k in range(4):
        phantom = phantoms.make_phantom(jax.random.key(k), (16, 16), spacing=2.0)
        groups.append(phantoms.misaligned_group(jax.random.key(10 + k), phantom, spacing=16.0,
                                                magnitude=2.0).images)
    present = np.ones((4, 3), bool)
    present[1, 2] = False
    return bingo_train.GroupData(unit_range(np.stack(groups).reshape(12, 16, 16))
                                 .reshape(4, 3, 16, 16), present), phantom.grid


def test_unit_range_maps_percentiles_to_unit_range():
    """BInGo's normalisation (:func:`xjax.intensity.unit_range`) against its definition."""
    x = np.random.default_rng(0).normal(size=(2, 50, 40)) * np.array([1.0, 5.0])[:, None, None]
    y = unit_range(x)
    for a, b in zip(x, y):
        lo, hi = np.percentile(a, [0.5, 99.5])
        np.testing.assert_allclose(b, np.clip((a - lo) / (hi - lo), 0, 1), rtol=1e-5, atol=1e-6)


def test_partial_and_complete_batches(data):
    groups, _ = data
    images, slots = bingo_train.sample_batch(groups, TRAIN, 5)
    again = bingo_train.sample_batch(groups, TRAIN, 5)
    chex.assert_shape([images, slots], [(2, 2, 16, 16), (2, 2)])
    chex.assert_type([images, slots], [jnp.float32, jnp.int32])
    np.testing.assert_array_equal(np.asarray(images), np.asarray(again[0]))
    drawn = set()
    for step in range(40):
        images, slots = bingo_train.sample_batch(groups, TRAIN, step)
        rng = np.random.default_rng([TRAIN.seed, step])
        which = rng.integers(0, 4, 2)
        for b, g in enumerate(which):
            s = np.asarray(slots[b])
            assert s[0] != s[1] and groups.present[g, s].all()
            np.testing.assert_array_equal(np.asarray(images[b]), groups.images[g, s])
            drawn.add(tuple(sorted(s)))
    assert drawn == {(0, 1), (0, 2), (1, 2)}
    complete = dataclasses.replace(TRAIN, scheme="complete")
    full = bingo_train.GroupData(groups.images, np.ones((4, 3), bool))
    images, slots = bingo_train.sample_batch(full, complete, 0)
    chex.assert_shape(images, (2, 3, 16, 16))
    np.testing.assert_array_equal(np.asarray(slots), [[0, 1, 2], [0, 1, 2]])
    with pytest.raises(ValueError, match="complete learning"):
        bingo_train.train(bingo.create(CONFIG), groups, data[1], complete)


def test_a_few_steps_lower_the_loss(data, tmp_path):
    groups, grid = data
    model = bingo.create(CONFIG, seed=0)
    log = tmp_path / "log.jsonl"
    history = bingo_train.train(model, groups, grid, TRAIN, log_path=log, fast_compile=True)
    losses = np.array([h["loss"] for h in history])
    assert len(losses) == TRAIN.steps and np.all(np.isfinite(losses))
    assert losses[-3:].mean() < 0.8 * losses[:3].mean()
    lines = [json.loads(l) for l in log.read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 13))
    assert set(lines[0]) >= {"loss", "reconstruction", "velocity_kl", "structure_kl", "seconds"}


def test_resume_is_bit_identical_and_weights_round_trip(data, tmp_path):
    groups, grid = data
    short = dataclasses.replace(TRAIN, steps=3, log_every=3)
    long = dataclasses.replace(TRAIN, steps=6, log_every=3, checkpoint_every=3)
    straight = bingo.create(CONFIG, seed=1)
    bingo_train.train(straight, groups, grid, long, checkpoint_path=tmp_path / "a.npz",
                      fast_compile=True)
    resumed = bingo.create(CONFIG, seed=1)
    bingo_train.train(resumed, groups, grid, short, checkpoint_path=tmp_path / "b.npz",
                      fast_compile=True)
    fresh = bingo.create(CONFIG, seed=1)  # a new process would start from scratch like this
    history = bingo_train.train(fresh, groups, grid, long, checkpoint_path=tmp_path / "b.npz",
                                fast_compile=True)
    assert [h["step"] for h in history] == [6]
    a, b = nnx.state(straight, nnx.Param), nnx.state(fresh, nnx.Param)
    chex.assert_trees_all_equal(a, b, strict=True)
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(nnx.state(bingo.create(CONFIG, 1), nnx.Param))))
    with pytest.raises(ValueError, match="another configuration"):
        bingo_train.train(fresh, groups, grid, dataclasses.replace(long, learning_rate=1e-2),
                          checkpoint_path=tmp_path / "b.npz")
    bingo_train.save_model(tmp_path / "w.npz", fresh, extra={"note": "test"})
    loaded, stored = bingo_train.load_model(tmp_path / "w.npz")
    assert loaded.config == CONFIG and stored["note"] == "test"
    chex.assert_trees_all_equal(nnx.state(loaded, nnx.Param), b, strict=True)


def test_train_config_validation():
    with pytest.raises(ValueError, match="scheme"):
        bingo_train.TrainConfig(scheme="half")
    with pytest.raises(ValueError, match="batch_size"):
        bingo_train.TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="learning_rate"):
        bingo_train.TrainConfig(learning_rate=0.0)
