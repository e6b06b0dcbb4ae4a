"""Counter-based random numbers for the registration loop.

The loop needs a fixed count of random voxel indices per step and, once, Gaussian noise for the
posterior's initialisation (Eq. 22). Deriving them with ``jax.random`` would put a threefry kernel
into every compiled (stage, level) loop, and compiling those kernels costs about as much as the
rest of the step. Here a jax ``key``'s data seeds a 32-bit integer hash (xorshift-multiply
finaliser with well-mixing odd constants) evaluated at counters: a handful of integer ops,
deterministic for a given key, identical under ``vmap``, on every backend. It is a statistical
generator for sampling, not a cryptographic one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["seed", "fold", "bits", "randint", "uniform", "normal"]


def _mix(x):
    """A bijective avalanche hash of ``uint32`` values."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x21F0AAAD)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x735A2D97)
    return x ^ (x >> 15)


def seed(key):
    """A ``uint32`` scalar seed from a ``jax.random`` key (typed or raw ``uint32`` data)."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    words = jnp.ravel(data).astype(jnp.uint32)
    s = jnp.uint32(0x9E3779B9)
    for i in range(words.shape[0]):
        s = _mix(s ^ words[i])
    return s


def fold(s, counter):
    """A new seed from ``s`` and an integer ``counter`` (e.g. a stage/level or step number)."""
    return _mix(s ^ _mix(jnp.asarray(counter, jnp.uint32) + jnp.uint32(0x6A09E667)))


def bits(s, shape):
    """``uint32`` hash values at counters ``0 .. prod(shape) - 1``."""
    n = 1
    for d in shape:
        n *= d
    return _mix(_mix(jnp.arange(n, dtype=jnp.uint32) + s) ^ s).reshape(shape)


def randint(s, shape, high: int):
    """Integers uniform in ``[0, high)`` (modulo bias below ``high / 2**32``)."""
    return (bits(s, shape) % jnp.uint32(high)).astype(jnp.int32)


def uniform(s, shape, dtype=jnp.float32):
    """Uniform in ``(0, 1)``: 24 random bits, centred in their cell."""
    return ((bits(s, shape) >> 8).astype(dtype) + 0.5) / (1 << 24)


def normal(s, shape, dtype=jnp.float32):
    """Standard normal values by the Box-Muller transform."""
    u1 = uniform(fold(s, 1), shape, dtype)
    u2 = uniform(fold(s, 2), shape, dtype)
    return jnp.sqrt(-2.0 * jnp.log(u1)) * jnp.cos(2.0 * jnp.pi * u2)
