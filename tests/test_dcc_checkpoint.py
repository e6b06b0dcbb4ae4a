"""Checkpoints: exact round trips of training-like states, config, atomic writes, mismatch errors."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xjax.nn import checkpoint


def _state(seed):
    k = jax.random.key(seed)
    return {
        "params": {"w": jax.random.normal(k, (3, 4)), "b": jnp.arange(4, dtype=jnp.float32) / 7},
        "opt": (jnp.int32(seed), jax.random.uniform(k, (5,), jnp.float32)),
        "step": jnp.int32(11 + seed),
        "key": jax.random.fold_in(k, 3),
        "raw_key": jax.random.PRNGKey(seed),
    }


def test_round_trip_is_bit_exact(tmp_path):
    state = _state(1)
    path = tmp_path / "sub" / "ckpt.npz"
    checkpoint.save(path, state, config={"width": 8, "levels": [1, 2], "name": "dcc"})
    restored, config = checkpoint.restore(path, _state(2))
    assert config == {"width": 8, "levels": [1, 2], "name": "dcc"}
    assert checkpoint.read_config(path) == config
    typed = lambda a: jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
    assert jax.tree.map(typed, restored) == jax.tree.map(typed, state)  # typed keys come back typed
    unwrap = lambda tree: jax.tree.map(lambda a: jax.random.key_data(a) if typed(a) else a, tree)
    chex.assert_trees_all_equal(unwrap(restored), unwrap(state), strict=True)
    # the restored key draws the same numbers as the saved one
    np.testing.assert_array_equal(jax.random.uniform(restored["key"], (4,)), jax.random.uniform(state["key"], (4,)))


def test_overwrite_is_atomic_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "c.npz"
    checkpoint.save(path, _state(1))
    checkpoint.save(path, _state(3))
    assert os.listdir(tmp_path) == ["c.npz"]
    restored, config = checkpoint.restore(path, _state(0))
    assert config == {} and int(restored["step"]) == 14


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "c.npz"
    checkpoint.save(path, _state(1))
    with pytest.raises(ValueError, match="JSON"):
        checkpoint.save(path, _state(2), config={"bad": object()})
    assert os.listdir(tmp_path) == ["c.npz"]
    assert int(checkpoint.restore(path, _state(0))[0]["step"]) == 12


def test_mismatches_raise(tmp_path):
    path = tmp_path / "c.npz"
    checkpoint.save(path, _state(1))
    other = _state(1)
    other["params"]["w"] = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match=r"\['params'\]\['w'\]"):
        checkpoint.restore(path, other)
    del other["params"]["w"]
    with pytest.raises(ValueError, match="unexpected"):
        checkpoint.restore(path, other)
    with pytest.raises(ValueError, match="does not exist"):
        checkpoint.restore(tmp_path / "none.npz", other)
    np.savez(tmp_path / "plain.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="not an xjax checkpoint"):
        checkpoint.read_config(tmp_path / "plain.npz")
