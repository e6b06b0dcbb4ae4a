"""Training of BInGo (paper Sec. 2.4, Fig. 3): partial and complete learning with optax.

Data: a set of ``S`` groups of the same ``K`` modality slots, ``images`` ``(S, K, *spatial)`` on
one grid, with ``present`` ``(S, K)`` marking which slots hold an image (missing modalities are
allowed); slot ``k`` has modality index ``k``. Each step draws ``batch_size`` groups and from
each

* **complete** learning: all ``K`` slots (every drawn group must be complete);
* **partial** learning: two present slots chosen at random (bimodal pairs).

The train step is one ``jax.jit`` function over ``nnx.split`` state (graph definition static,
parameters a pytree) and an optax optimiser (Adam, the paper's learning rate 1e-3 by default).
Every random draw is a function of ``(seed, step)``: the data by a numpy generator seeded with
``[seed, step]``, the reparameterisation noise by ``fold_in(key(seed), step)``. A checkpoint
holds parameters, optimiser state and step, so a resumed run is bit-identical to an
uninterrupted one. Images are normalised to [0, 1] per image (:func:`xjax.intensity.unit_range`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from xjax.grid import Grid
from xjax.nn import checkpoint
from xjax.nn.bingo.losses import ElboWeights
from xjax.nn.bingo.model import BInGo, BingoConfig, create, forward, loss_terms
from xjax.nn.training import FAST_COMPILE, due

__all__ = [
    "GroupData",
    "TrainConfig",
    "TrainState",
    "init_state",
    "load_model",
    "sample_batch",
    "save_model",
    "train",
    "train_step",
]

SCHEMES = ("complete", "partial")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of a training run (hashable: static under ``jax.jit``).

    Attributes:
      steps: total optimiser steps.
      learning_rate: Adam's step size.
      batch_size: groups per step.
      scheme: ``"complete"`` (whole groups) or ``"partial"`` (pairs of modalities).
      seed: seed of every random draw (initialisation, data, noise).
      weights: the ELBO's weights (:class:`~xjax.nn.bingo.losses.ElboWeights`).
      log_every: steps between log lines (and host syncs).
      checkpoint_every: steps between checkpoints (0: only at the end).
    """

    steps: int = 1000
    learning_rate: float = 1e-3
    batch_size: int = 4
    scheme: str = "complete"
    seed: int = 0
    weights: ElboWeights = ElboWeights()
    log_every: int = 10
    checkpoint_every: int = 100

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(f"TrainConfig.checkpoint_every must be an int >= 0, "
                             f"got {self.checkpoint_every!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate!r}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"TrainConfig.scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"TrainConfig.seed must be an int, got {self.seed!r}")
        if isinstance(self.weights, dict):
            object.__setattr__(self, "weights", ElboWeights(**self.weights))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class GroupData(NamedTuple):
    """Training groups on one grid.

    Attributes:
      images: ``(S, K, *spatial)`` float32, intensities normalised to [0, 1]
        (:func:`xjax.intensity.unit_range`).
      present: ``(S, K)`` bool, which modality slots hold an image.
    """

    images: np.ndarray
    present: np.ndarray


class TrainState(NamedTuple):
    """What a checkpoint holds: parameters (an ``nnx.State``), optax state and the step."""

    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array


def _check_data(data: GroupData, config: TrainConfig, num_modalities: int) -> None:
    images, present = np.asarray(data.images), np.asarray(data.present, bool)
    if images.ndim < 4 or present.shape != images.shape[:2]:
        raise ValueError(f"GroupData needs images (S, K, *spatial) and present (S, K), got "
                         f"{images.shape} and {present.shape}")
    if images.shape[1] > num_modalities:
        raise ValueError(f"data has {images.shape[1]} modality slots but the model "
                         f"{num_modalities}")
    if config.scheme == "complete" and not present.all():
        raise ValueError("complete learning needs every modality of every group; "
                         f"{int((~present).sum())} are missing (use scheme='partial')")
    if config.scheme == "partial" and (present.sum(1) < 2).any():
        raise ValueError(f"partial learning needs >= 2 modalities per group; groups "
                         f"{np.flatnonzero(present.sum(1) < 2).tolist()} have fewer")


def sample_batch(data: GroupData, config: TrainConfig, step: int):
    """The batch of step ``step``: ``(images (B, G, *spatial), modalities (B, G))`` with
    ``G = K`` (complete) or 2 (partial), a deterministic function of ``(config.seed, step)``."""
    rng = np.random.default_rng([config.seed, step])
    groups = rng.integers(0, data.images.shape[0], config.batch_size)
    if config.scheme == "complete":
        slots = np.broadcast_to(np.arange(data.images.shape[1]), (config.batch_size,
                                                                 data.images.shape[1]))
    else:
        slots = np.stack([rng.choice(np.flatnonzero(data.present[g]), 2, replace=False)
                          for g in groups])
    images = data.images[groups[:, None], slots]
    return jnp.asarray(images, jnp.float32), jnp.asarray(slots, jnp.int32)


@functools.lru_cache(maxsize=8)
def _optimizer(learning_rate: float) -> optax.GradientTransformation:
    return optax.adam(learning_rate)


def init_state(model: BInGo, config: TrainConfig) -> TrainState:
    """Step 0: the model's parameters and a fresh optimiser state."""
    params = nnx.state(model, nnx.Param)
    return TrainState(params, _optimizer(config.learning_rate).init(params),
                      jnp.zeros((), jnp.int32))


def _step(graphdef, state: TrainState, images, modalities, grid: Grid, *,
               weights: ElboWeights, learning_rate: float, seed: int):
    """One optax (Adam) step on the mean negative ELBO of a batch of groups.

    Args:
      graphdef: ``nnx.split(model, nnx.Param, ...)[0]`` (static).
      state: :class:`TrainState`.
      images: ``(B, G, *grid.shape)``; modalities: ``(B, G)`` int.
      grid: the images' grid (static).
      weights, learning_rate, seed: those of :class:`TrainConfig` (static); the noise of step
        ``s`` is drawn from ``fold_in(key(seed), s)``.

    Returns:
      ``(state, metrics)``: the next state and a dict of scalars (``loss`` and the terms of
      :func:`~xjax.nn.bingo.model.loss_terms`, means over the batch).
    """
    optimizer = _optimizer(learning_rate)
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    keys = jax.random.split(key, images.shape[0])

    def loss_fn(params):
        model = nnx.merge(graphdef, params)

        def one(x, m, k):
            return loss_terms(forward(model, x, m, grid, k), x, weights)

        loss, terms = jax.vmap(one)(images, modalities, keys)
        return jnp.mean(loss), jax.tree.map(jnp.mean, terms)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state, state.step + 1), {"loss": loss, **terms}


_STATIC = ("graphdef", "grid", "weights", "learning_rate", "seed")
train_step = jax.jit(_step, static_argnames=_STATIC)
train_step.__doc__ = _step.__doc__
_train_step_fast = jax.jit(_step, static_argnames=_STATIC, compiler_options=FAST_COMPILE)


_SCHEDULE = ("steps", "log_every", "checkpoint_every")


def _checkpoint_config(model_config: BingoConfig, config: TrainConfig, grid: Grid) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint (everything but the
    schedule: a run may be resumed with more steps), as JSON data."""
    train = {k: v for k, v in config.to_dict().items() if k not in _SCHEDULE}
    return json.loads(json.dumps({"model": model_config.to_dict(), "train": train,
                                  "grid": {"shape": list(grid.shape),
                                           "affine": [list(r) for r in grid.affine]}}))


def train(model: BInGo, data: GroupData, grid: Grid, config: TrainConfig, *,
          checkpoint_path=None, log_path=None,
          progress: Callable[[int, int, float], None] | None = None, fast_compile: bool = False):
    """Train ``model`` in place on ``data`` for ``config.steps`` steps.

    If ``checkpoint_path`` exists, training resumes from it (its configuration must match);
    checkpoints are written there every ``config.checkpoint_every`` steps and at the end.

    Args:
      model: the networks (updated in place with the trained parameters).
      data: :class:`GroupData` on ``grid``.
      grid: the images' grid.
      config: :class:`TrainConfig`.
      checkpoint_path: optional ``.npz`` file.
      log_path: optional JSON-lines log, one line per ``log_every`` steps (appended).
      progress: optional ``progress(done, total, loss)`` callback (e.g.
        :class:`xjax.progress.ProgressBar`).
      fast_compile: compile the step with :data:`xjax.nn.training.FAST_COMPILE` (same results up
        to float rounding, faster to compile, slower to run).

    Returns:
      The list of logged metric dicts (``step``, ``loss``, terms, ``seconds``).
    """
    _check_data(data, config, model.config.num_modalities)
    if data.images.shape[2:] != grid.shape:
        raise ValueError(f"data images {data.images.shape} do not lie on {grid}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = init_state(model, config)
    ckpt_config = _checkpoint_config(model.config, config, grid)
    if checkpoint_path is not None and os.path.exists(checkpoint_path):
        stored = checkpoint.read_config(checkpoint_path)
        if stored != ckpt_config:
            raise ValueError(f"checkpoint {checkpoint_path} was written with another "
                             f"configuration: {stored}")
        state, _ = checkpoint.restore(checkpoint_path, state)
    step_fn = _train_step_fast if fast_compile else train_step
    history, start = [], time.perf_counter()
    for step in range(int(state.step), config.steps):
        images, modalities = sample_batch(data, config, step)
        state, metrics = step_fn(graphdef, state, images, modalities, grid,
                                 weights=config.weights, learning_rate=config.learning_rate,
                                 seed=config.seed)
        done = step + 1
        if due(done, config.steps, config.log_every):
            entry = {"step": done, **{k: float(v) for k, v in metrics.items()},
                     "seconds": time.perf_counter() - start}
            history.append(entry)
            if log_path is not None:
                with open(log_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
            if progress is not None:
                progress(done, config.steps, entry["loss"])
        if checkpoint_path is not None and due(done, config.steps, config.checkpoint_every):
            checkpoint.save(checkpoint_path, state, config=ckpt_config)
    nnx.update(model, state.params)
    return history


def save_model(path, model: BInGo, *, extra: dict | None = None) -> None:
    """Write the model's parameters and configuration (weights for inference) to ``path``."""
    checkpoint.save(path, nnx.state(model, nnx.Param),
                    config={"model": model.config.to_dict(), **(extra or {})})


def load_model(path) -> tuple[BInGo, dict]:
    """A model from :func:`save_model`'s file: ``(model, stored config dict)``."""
    stored = checkpoint.read_config(path)
    if checkpoint.network_of(stored) == "DCC":
        raise ValueError(f"{path} holds DCC weights, not BInGo weights ('xjax dcc predict' reads "
                         "them)")
    if checkpoint.network_of(stored) != "BInGo":
        raise ValueError(f"{path} holds no BInGo model configuration")
    model = create(BingoConfig.from_dict(stored["model"]))
    params, _ = checkpoint.restore(path, nnx.state(model, nnx.Param))
    nnx.update(model, params)
    return model, stored
