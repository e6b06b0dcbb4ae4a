"""Training and inference of the DCC network (paper Sec. 3.5 and 4.4.1).

Data: a :class:`Dataset` of ``P`` groups of ``N`` images on one grid (each group roughly aligned),
with labels where the strategy needs them. Every training step draws ``batch_size`` groups and, for
each image, one displacement from a bank of random B-spline FFDs of several mesh spacings (the
paper's synthetic misalignment augmentation), warps images, labels and label probabilities with it
(:func:`xjax.warp.warp` on :func:`~xjax.nn.dcc.model.unit_grid`, border-extended), and takes one
optax step on the DCC loss (Eq. 47).

Branches (paper Sec. 3.5.3, 4.4.1): the segmentation branch (encoder, bottleneck, segmentation
decoder; Adam, lr 1e-3) and the registration branch (:data:`~xjax.nn.dcc.model.REGISTRATION_BRANCH`;
Adam, lr 1e-4) are updated alternately, ``alternate_every`` steps each, both on the total loss.

Strategies (Sec. 4.4.1): ``"DGR"`` no labels; ``"DCC+AT"`` an atlas (majority vote of training
labels) as a common-space prior; ``"DCC+BS"`` labels of one modality; ``"DCC+All"`` all labels.

The train step is one ``jax.jit`` function of ``(TrainState, Dataset)`` over the ``nnx.split``
parameters (graph definition static); everything random comes from the key in the state, so a run
resumed from a checkpoint (:mod:`xjax.nn.checkpoint`) continues bit-exactly. Images are z-scored
(:func:`xjax.intensity.zscore`); displacements are in voxels of the common grid.
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

import xjax.warp
from xjax import phantoms
from xjax.intensity import zscore
from xjax.nn import checkpoint
from xjax.nn.dcc.losses import Group, LossConfig, clip_probabilities, dcc_losses, label_probabilities, posterior, warp
from xjax.nn.dcc.model import DCC, REGISTRATION_BRANCH, DCCConfig, create, unit_grid
from xjax.nn.training import compiler_options, due

__all__ = [
    "STRATEGIES",
    "TrainConfig",
    "Dataset",
    "TrainState",
    "Prediction",
    "make_dataset",
    "ffd_bank",
    "split_params",
    "init_state",
    "make_train_step",
    "train",
    "predict",
    "make_predictor",
    "save_weights",
    "load_weights",
]

STRATEGIES = ("DGR", "DCC+AT", "DCC+BS", "DCC+All")

_REGISTRATION = nnx.Any(*(nnx.PathContains(name) for name in REGISTRATION_BRANCH))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Static training settings (hashable; stored in checkpoints).

    Attributes:
      strategy: one of :data:`STRATEGIES`.
      labelled_modality: the image index of a group whose labels DCC+BS observes.
      batch_size: groups per step (the paper: 20).
      seg_lr, reg_lr: Adam learning rates of the two branches (the paper: 1e-3, 1e-4).
      alternate_every: steps per branch before switching (the paper: 5).
      ffd_spacings: control-point spacings (voxels) of the augmentation FFDs.
      ffd_per_spacing: FFDs drawn per spacing (the paper: 5).
      ffd_ratio: coefficient bound as a fraction of the spacing (below 0.4 / len(spacings) keeps
        every field diffeomorphic, :func:`xjax.phantoms.random_ffd`).
      seed: seeds the network, the FFD bank and the batch sampling.
    """

    strategy: str = "DGR"
    labelled_modality: int = 0
    batch_size: int = 4
    seg_lr: float = 1e-3
    reg_lr: float = 1e-4
    alternate_every: int = 5
    ffd_spacings: tuple[float, ...] = (8.0, 12.0, 16.0, 24.0)
    ffd_per_spacing: int = 5
    ffd_ratio: float = 0.08
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "ffd_spacings", tuple(float(s) for s in self.ffd_spacings))
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        for name in ("batch_size", "alternate_every", "ffd_per_spacing"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.seg_lr <= 0 or self.reg_lr <= 0:
            raise ValueError(f"learning rates must be positive, got seg_lr={self.seg_lr}, reg_lr={self.reg_lr}")
        if not self.ffd_spacings or min(self.ffd_spacings) <= 0:
            raise ValueError(f"ffd_spacings must be positive, got {self.ffd_spacings!r}")
        if not 0.0 <= self.ffd_ratio * len(self.ffd_spacings) < 0.4:
            raise ValueError(f"ffd_ratio * len(ffd_spacings) must lie in [0, 0.4), got ffd_ratio={self.ffd_ratio}")

    def labelled(self, num_images: int) -> np.ndarray:
        """``(N,)`` bool: which images of a group are in ``J`` under this strategy."""
        mask = np.full(num_images, self.strategy == "DCC+All")
        if self.strategy == "DCC+BS":
            if not 0 <= self.labelled_modality < num_images:
                raise ValueError(f"labelled_modality must lie in [0, {num_images}), got {self.labelled_modality}")
            mask[self.labelled_modality] = True
        return mask

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Dataset(NamedTuple):
    """Training groups on one grid of shape ``S`` (device arrays).

    Attributes:
      images: ``(P, N, *S)`` float32, z-scored per image (:func:`xjax.intensity.zscore`).
      modality: ``(N,)`` int32 modality index of each position in a group.
      labels: ``(P, N, *S)`` int32 (zeros where there are none).
      label_probs: ``(P, N, *S, K)`` Eq. (38) probabilities of ``labels``.
      labelled: ``(N,)`` bool, ``J`` of the strategy.
      prior: ``(*S, K)`` common-space prior: the atlas for DCC+AT, else uniform.
      bank: ``(F, *S, D)`` augmentation displacements in voxels.
    """

    images: jax.Array
    modality: jax.Array
    labels: jax.Array
    label_probs: jax.Array
    labelled: jax.Array
    prior: jax.Array
    bank: jax.Array


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree; what a checkpoint stores)."""

    seg_params: nnx.State
    reg_params: nnx.State
    seg_opt: optax.OptState
    reg_opt: optax.OptState
    step: jax.Array
    key: jax.Array


class Prediction(NamedTuple):
    """Inference on one group.

    Attributes:
      probs: ``(N, *S, K)`` ``rho_hat``; displacement: ``(N, *S, D)`` voxels (group mean zero);
      warped: ``(N, *S)`` images pulled into the common space; posterior: ``(*S, K)`` ``Z[2]``;
      segmentation: ``(*S)`` int32 argmax of the posterior (Eq. 53).
    """

    probs: jax.Array
    displacement: jax.Array
    warped: jax.Array
    posterior: jax.Array
    segmentation: jax.Array


def ffd_bank(shape, config: TrainConfig) -> jax.Array:
    """The augmentation bank: ``ffd_per_spacing`` random FFDs per spacing in ``config.ffd_spacings``
    on :func:`~xjax.nn.dcc.model.unit_grid` ``(shape)``, coefficients uniform in ``+-ffd_ratio * spacing`` voxels.
    Returns ``(F, *shape, D)`` float32 voxel displacements."""
    grid = unit_grid(shape)
    keys = jax.random.split(jax.random.key(config.seed + 1), len(config.ffd_spacings))
    return jnp.concatenate([
        phantoms.random_ffd(k, grid, config.ffd_per_spacing, spacing=s, magnitude=config.ffd_ratio * s)
        for k, s in zip(keys, config.ffd_spacings)])


def make_dataset(images, labels, modality, num_classes: int, config: TrainConfig, *, tau: float = 1.0) -> Dataset:
    """Assemble a :class:`Dataset` (setup time, host side).

    Args:
      images: ``(P, N, *S)`` raw intensities (z-scored here, per image).
      labels: ``(P, N, *S)`` int labels in ``[0, K)``, or ``None`` (DGR only).
      modality: ``(N,)`` modality indices.
      num_classes: ``K``.
      config: the strategy, the FFD bank settings and the labelled modality.
      tau: slope of Eq. (38), per voxel.
    """
    images = np.asarray(images, np.float32)
    if images.ndim not in (4, 5):
        raise ValueError(f"images must be (P, N, *S) with 2 or 3 spatial axes, got shape {images.shape}")
    n, spatial = images.shape[1], images.shape[2:]
    needs_labels = config.strategy != "DGR"
    if labels is None:
        if needs_labels:
            raise ValueError(f"strategy {config.strategy!r} needs labels, got labels=None")
        labels = np.zeros(images.shape, np.int32)
    labels = np.asarray(labels, np.int32)
    if labels.shape != images.shape:
        raise ValueError(f"labels of shape {labels.shape} do not match images of shape {images.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    modality = np.asarray(modality, np.int32)
    if modality.shape != (n,):
        raise ValueError(f"modality must have shape ({n},), got {modality.shape}")
    probs_fn = jax.jit(jax.vmap(lambda l: label_probabilities(l, num_classes, tau)))
    label_probs = jnp.stack([probs_fn(jnp.asarray(l)) for l in labels])
    prior = jnp.full(spatial + (num_classes,), 1.0 / num_classes, jnp.float32)
    if config.strategy == "DCC+AT":
        votes = np.stack([(labels[:, config.labelled_modality] == k).sum(0) for k in range(num_classes)], -1)
        prior = label_probabilities(jnp.asarray(votes.argmax(-1)), num_classes, tau)
    normalised = jax.vmap(zscore)(jnp.asarray(images))
    return Dataset(normalised, jnp.asarray(modality), jnp.asarray(labels), label_probs,
                   jnp.asarray(config.labelled(n)), prior, ffd_bank(spatial, config))


def split_params(model: DCC):
    """``(graphdef, seg_params, reg_params)``: the model split into its two branches."""
    graphdef, reg, seg = nnx.split(model, _REGISTRATION, nnx.Param)
    return graphdef, seg, reg


def _optimisers(config: TrainConfig):
    return optax.adam(config.seg_lr), optax.adam(config.reg_lr)


def init_state(model: DCC, config: TrainConfig) -> TrainState:
    """The state at step 0: the model's parameters, fresh Adam states, key from ``config.seed``."""
    _, seg, reg = split_params(model)
    seg_tx, reg_tx = _optimisers(config)
    return TrainState(seg, reg, seg_tx.init(seg), reg_tx.init(reg), jnp.zeros((), jnp.int32),
                      jax.random.key_data(jax.random.key(config.seed + 2)))


def _augmented_batch(key, data: Dataset, batch_size: int) -> Group:
    """``batch_size`` random groups, each image pulled through a random FFD of the bank."""
    k_group, k_field = jax.random.split(key)
    num_groups, n = data.images.shape[:2]
    which = jax.random.randint(k_group, (batch_size,), 0, num_groups)
    fields = data.bank[jax.random.randint(k_field, (batch_size, n), 0, data.bank.shape[0])]
    grid = unit_grid(data.images.shape[2:])

    def pull(values, u, order):
        return xjax.warp.warp(values, u, grid, order=order)[0]

    pull_group = jax.vmap(jax.vmap(pull, in_axes=(0, 0, None)), in_axes=(0, 0, None))
    return Group(
        images=pull_group(data.images[which], fields, 1),
        modality=jnp.broadcast_to(data.modality, (batch_size, n)),
        labels=pull_group(data.labels[which], fields, 0),
        label_probs=pull_group(data.label_probs[which], fields, 1),
        labelled=jnp.broadcast_to(data.labelled, (batch_size, n)),
        prior=jnp.broadcast_to(data.prior, (batch_size,) + data.prior.shape),
    )


def make_train_step(graphdef, loss_config: LossConfig, config: TrainConfig, *, fast_compile: bool = False) -> Callable:
    """The jitted step ``(TrainState, Dataset) -> (TrainState, metrics)``.

    ``metrics`` holds the batch means of the :class:`~xjax.nn.dcc.losses.Losses` fields and the
    ``phase`` (0: segmentation branch updated, 1: registration branch). The step reads only the
    optimisation fields of ``config`` (the strategy lives in the :class:`Dataset`), and the
    function is cached on them: every strategy, seed and repeated or resumed :func:`train` call
    with the same graph and settings reuses one compiled program per data shape.
    """
    return _train_step(graphdef, loss_config, config.batch_size, config.seg_lr, config.reg_lr,
                       config.alternate_every, fast_compile)


@functools.lru_cache(maxsize=16)
def _train_step(graphdef, loss_config: LossConfig, batch_size: int, seg_lr: float, reg_lr: float,
                alternate_every: int, fast_compile: bool) -> Callable:
    seg_tx, reg_tx = optax.adam(seg_lr), optax.adam(reg_lr)

    def loss_fn(seg, reg, batch: Group):
        model = nnx.merge(graphdef, reg, seg)
        out = jax.vmap(model)(batch.images, batch.modality)
        losses = jax.vmap(dcc_losses, in_axes=(0, 0, 0, None))(out.probs, out.displacement, batch, loss_config)
        losses = jax.tree.map(jnp.mean, losses)
        return losses.total, losses

    @functools.partial(jax.jit, compiler_options=compiler_options(fast_compile))
    def step(state: TrainState, data: Dataset):
        key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
        batch = _augmented_batch(sub, data, batch_size)
        (_, losses), (g_seg, g_reg) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            state.seg_params, state.reg_params, batch)
        phase = (state.step // alternate_every) % 2

        def update_seg(s: TrainState):
            updates, opt = seg_tx.update(g_seg, s.seg_opt, s.seg_params)
            return s._replace(seg_params=optax.apply_updates(s.seg_params, updates), seg_opt=opt)

        def update_reg(s: TrainState):
            updates, opt = reg_tx.update(g_reg, s.reg_opt, s.reg_params)
            return s._replace(reg_params=optax.apply_updates(s.reg_params, updates), reg_opt=opt)

        new = jax.lax.cond(phase == 0, update_seg, update_reg, state)
        new = new._replace(step=state.step + 1, key=jax.random.key_data(key))
        return new, dict(losses._asdict(), phase=phase)

    return step


def train(model: DCC, data: Dataset, loss_config: LossConfig, config: TrainConfig, steps: int, *,
          checkpoint_path=None, checkpoint_every: int = 100, log_path=None, log_every: int = 10,
          progress: Callable[[int, int, float], None] | None = None, extra_config: dict | None = None,
          fast_compile: bool = False):
    """Train for ``steps`` steps in total, resuming from ``checkpoint_path`` when it exists.

    Args:
      model: the network (its parameters are the starting point when no checkpoint exists).
      data, loss_config, config: see :class:`Dataset`, :class:`~xjax.nn.dcc.losses.LossConfig`,
        :class:`TrainConfig`.
      steps: the total number of steps (a resumed run continues from the stored step).
      checkpoint_path: ``.npz`` file written every ``checkpoint_every`` steps and at the end.
      log_path: a JSON-lines metrics log, one line per ``log_every`` steps (appended).
      progress: a callback ``(done, total, loss)`` such as :class:`xjax.progress.ProgressBar`.
      extra_config: JSON-serialisable additions to the checkpoint's config.
      fast_compile: compile with :data:`xjax.nn.training.FAST_COMPILE`.

    Returns:
      ``(model, state)``: the model with the trained parameters and the final :class:`TrainState`.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    graphdef, _, _ = split_params(model)
    state = init_state(model, config)
    stored = {"model": model.config.to_dict(), "train": config.to_dict(),
              "loss": dataclasses.asdict(loss_config), **(extra_config or {})}
    if checkpoint_path is not None and os.path.exists(checkpoint_path):
        state, _ = checkpoint.restore(checkpoint_path, state)
    step_fn = make_train_step(graphdef, loss_config, config, fast_compile=fast_compile)
    start = int(state.step)
    log = open(log_path, "a") if log_path is not None else None
    try:
        clock = time.perf_counter()
        for i in range(start, steps):
            state, metrics = step_fn(state, data)
            done = i + 1
            if due(done, steps, log_every):
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if log is not None:
                    log.write(json.dumps({"step": done, "seconds": round(time.perf_counter() - clock, 3),
                                          **values}) + "\n")
                    log.flush()
                if progress is not None:
                    progress(done, steps, values["total"])
            if checkpoint_path is not None and due(done, steps, checkpoint_every):
                checkpoint.save(checkpoint_path, state, config=stored)
    finally:
        if log is not None:
            log.close()
    return nnx.merge(graphdef, state.reg_params, state.seg_params), state


def predict(model: DCC, images, modality, *, num_classes: int, labelled=None, prior=None,
            bins: int = 32, zeta: float = 0.01) -> Prediction:
    """Register and segment one group (not jitted here; wrap in ``nnx.jit`` for repeated calls).

    The posterior is ``Z[2]`` of Eq. (40) with ``rho_hat`` standing in for the labels of the
    images in ``labelled`` (Eq. 53), clipped with the test ``zeta``.

    Args:
      images: ``(N, *S)`` z-scored images (:func:`xjax.intensity.zscore`); modality ``(N,)``.
      labelled: optional ``(N,)`` bool, the ``J`` the network was trained with (default none).
      prior: optional ``(*S, K)`` common-space prior (the DCC+AT atlas).
    """
    out = model(images, modality)
    n, spatial = images.shape[0], images.shape[1:]
    labelled = jnp.zeros((n,), bool) if labelled is None else jnp.asarray(labelled, bool)
    prior = jnp.full(spatial + (num_classes,), 1.0 / num_classes) if prior is None else prior
    warped, inside = jax.vmap(warp)(images, out.displacement)
    clipped = clip_probabilities(out.probs, zeta)
    warped_probs = jax.vmap(lambda p, u: warp(p, u, fill=1.0 / num_classes)[0])(clipped, out.displacement)

    def flat(a):  # (N, *S, ...) -> (N, V, ...)
        return a.reshape((n, -1) + a.shape[1 + len(spatial):])

    state = posterior(flat(images), flat(warped), jnp.prod(inside, 0).reshape(-1), flat(clipped),
                      flat(warped_probs), labelled, clip_probabilities(prior, zeta).reshape(-1, num_classes), bins)
    post = state.posterior.reshape(spatial + (num_classes,))
    return Prediction(out.probs, out.displacement, warped, post, jnp.argmax(post, -1).astype(jnp.int32))


@functools.lru_cache(maxsize=16)
def make_predictor(graphdef, *, num_classes: int, bins: int = 32, zeta: float = 0.01,
                   fast_compile: bool = False) -> Callable:
    """:func:`predict` as one cached, jitted function
    ``(params, images, modality, labelled, prior) -> Prediction`` over the model's state
    (``nnx.split(model)[1]``); ``labelled`` ``(N,)`` bool and ``prior`` ``(*S, K)`` are arrays
    (uniform ``1/K`` for no prior). Compiles once per group shape for a given graph."""
    @functools.partial(jax.jit, compiler_options=compiler_options(fast_compile))
    def run(params, images, modality, labelled, prior):
        return predict(nnx.merge(graphdef, params), images, modality, num_classes=num_classes, labelled=labelled,
                       prior=prior, bins=bins, zeta=zeta)

    return run


def save_weights(path, model: DCC, prior, config: dict, *, half: bool = True) -> None:
    """Write a model for inference (parameters only, no optimiser state) with its common-space
    prior ``(*S, K)`` and a JSON ``config`` (strategy, labelled images, loss settings, ...);
    :func:`load_weights` reads it back. Atomic (:mod:`xjax.nn.checkpoint`).

    ``half``: store the parameters as float16 (half the size, for weights shipped with the
    package; :func:`load_weights` returns float32 either way)."""
    prior = jnp.asarray(prior, jnp.float32)
    dtype = jnp.float16 if half else jnp.float32
    params = jax.tree.map(lambda a: a.astype(dtype), nnx.state(model, nnx.Param))
    stored = {**config, "model": model.config.to_dict(), "prior_shape": list(prior.shape),
              "param_dtype": jnp.dtype(dtype).name}
    checkpoint.save(path, {"params": params, "prior": prior}, config=stored)


def load_weights(path) -> tuple[DCC, jax.Array, dict]:
    """``(model, prior, config)`` from a file written by :func:`save_weights` (float32 model)."""
    config = checkpoint.read_config(path)
    if checkpoint.network_of(config) == "BInGo":
        raise ValueError(f"{path} holds BInGo weights, not DCC weights ('xjax bingo predict' reads "
                         "them)")
    try:
        model = create(DCCConfig(**config["model"]))
        stored = jnp.dtype(config.get("param_dtype", "float32"))
        like = {"params": jax.tree.map(lambda a: a.astype(stored), nnx.state(model, nnx.Param)),
                "prior": jnp.zeros(tuple(config["prior_shape"]), jnp.float32)}
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a DCC weights file ({e})") from None
    tree, _ = checkpoint.restore(path, like)
    nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.float32), tree["params"]))
    return model, tree["prior"], config
