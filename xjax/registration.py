"""X-CoReg groupwise registration (Algorithm 1): stages x pyramid levels, a ``lax.scan`` inner loop.

One registration step, for a group of ``N`` images on one common grid (Algorithm 1, lines 3-5):

1. displacements ``u_j`` of the current transforms (centred by Eq. 37 in unbiased mode, or with
   the reference image held at the identity), warped images on the whole grid;
2. E-step over the whole grid without gradient: appearance models ``f_jk`` from the previous
   posterior (or fixed ground-truth models, X-Reg-GT), posterior ``Gamma`` (Eq. 12) and ``pi``
   (Eq. 14) over the overlap region ``Omega_phi``;
3. a fixed count of voxels drawn at random (``sample_rate`` of the level's grid, redrawn every step),
   the X-metric of the warped samples against the new posterior, minus ``lambda`` times the bending
   energy summed over the group (Eq. 15), and one optax update of the transform parameters.

The loop over the steps of each (stage, pyramid level) is a ``lax.scan``, traced once; the whole
registration is one jitted program, compiled once per configuration and shape (the command line
keeps compiled programs on disk). Everything is a pure function of arrays, so
``jax.vmap(register)`` runs batches of independent groups of one shape.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from xjax import presets
from xjax import random as xrandom
from xjax import validate
from xjax.config import Config, Mode, Quality, Result, Stage
from xjax.em import appearance_from_labels
from xjax.grid import Grid, apply_linear
from xjax.interpolate import sample
from xjax.objectives import Objective, XMetric
from xjax.regularizers import jacobian_determinant
from xjax.transforms import Transform, chain_displacement
from xjax.transforms.base import grid_points
from xjax.warp import warp_group

__all__ = ["register", "pyramid", "intensity_ranges", "StepProblem", "step_problem"]

# ---- pyramid -------------------------------------------------------------------------------------

def _halve(image, ndim: int):
    """Average 2^D blocks (edge-replicated for odd sizes): the level below on ``Grid.downsample(2)``."""
    pad = [(0, s % 2) for s in image.shape[:ndim]] + [(0, 0)] * (image.ndim - ndim)
    image = jnp.pad(image, pad, mode="edge")
    shape = []
    for s in image.shape[:ndim]:
        shape += [s // 2, 2]
    image = image.reshape(tuple(shape) + image.shape[ndim:])
    return image.mean(axis=tuple(range(1, 2 * ndim, 2)))


def pyramid(image, grid: Grid, levels: int) -> list:
    """``[(image, grid)]`` from full resolution (level 0) to level ``levels - 1``, each level
    averaging 2^D blocks of the previous one. ``image`` is ``(*spatial)`` or ``(*spatial, C)``."""
    out = [(image, grid)]
    for _ in range(levels - 1):
        image, grid = _halve(image, grid.ndim), grid.downsample(2)
        out.append((image, grid))
    return out


# ---- one (stage, level) --------------------------------------------------------------------------

class _Level(NamedTuple):
    """Everything static about one (stage, level) loop."""

    stage: Stage  # with a bound transform
    grid: Grid
    frozen: tuple[Transform, ...]
    objective: Objective
    mode: Mode
    reference: int
    progress: Callable | None
    total_steps: int


class _Draw(NamedTuple):
    """One step's random sample: voxel indices ``(S,)`` and the jitter offsets ``(S, D)`` in mm."""

    index: jax.Array
    offset: jax.Array


class _Carry(NamedTuple):
    params: Any
    opt_state: Any
    state: Any  # the objective's state
    draw: _Draw  # this step's sample, drawn at the end of the previous step (see _run_level)


TRACES = {"level": 0}  # incremented when a (stage, level) loop is traced; tests count compiles


def _optimizer(stage: Stage) -> optax.GradientTransformation:
    """The stage's optax transform (default: Adam whose step size decays along a cosine to 5% over
    each level, so the parameters settle instead of jittering by about one step size), followed
    by the transform's per-parameter scales."""
    base = stage.optimizer
    if base is None:
        base = optax.adam(optax.cosine_decay_schedule(stage.learning_rate, stage.iterations, alpha=0.05))
    scales = stage.transform.lr_scale()

    def scale(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * s, updates, scales), state

    return optax.chain(base, optax.GradientTransformation(lambda p: optax.EmptyState(), scale))


def _effective(level: _Level, params):
    """The applied parameters: Eq. (37) projection, or the reference image held at identity."""
    spec = level.stage.transform
    if level.mode == "unbiased":
        return spec.center(params)
    identity = spec.identity()
    return jax.tree.map(lambda p, i: p.at[level.reference].set(i.astype(p.dtype)), params, identity)


def _displacements(spec: Transform, frozen: tuple, frozen_params, params, grid: Grid):
    """``(N, *grid.shape, D)`` displacements of the chains ``frozen o spec`` of the group."""

    def one(fp, p):
        return chain_displacement(tuple(zip(frozen, fp)), spec, p, grid)

    return jax.vmap(one)(frozen_params, params)


def _warp_group(images, grid: Grid, points):
    """Pull ``(N, *spatial)`` images at world points ``(N, M, D)``: values (0 outside) and inside
    flags, by :func:`xjax.warp.warp_group`."""
    return warp_group(images, points, grid)


def _step_loss(level: _Level, images, mask, ranges, x, frozen_params, params, state, drawn: _Draw):
    """One step's loss ``-similarity + bending`` and its auxiliaries ``(state, emptied)``; ``x``
    are the level grid's points ``(V, D)`` in mm.

    The objective's update (the E-step for the X-metric) runs without gradient over the whole level
    grid; the similarity is differentiated through the warp at the drawn sample only.
    """
    stage, grid = level.stage, level.grid
    n, d, v = images.shape[0], grid.ndim, grid.size
    lo, hi = ranges
    spec, objective = stage.transform, level.objective
    eff = _effective(level, params)
    u = _displacements(spec, level.frozen, frozen_params, eff, grid).reshape(n, v, d)
    points = x[None] + u
    warped, inside = _warp_group(images, grid, jax.lax.stop_gradient(points))
    weights = mask * jnp.prod(inside, axis=0)
    idx = drawn.index
    state = objective.update(jax.lax.stop_gradient(state), warped, weights, lo, hi, stage.bins, idx)
    values, _ = _warp_group(images, grid, points[:, idx] + drawn.offset)
    loss = -objective.similarity(state, values, weights[idx], idx, lo, hi, stage.bins)
    if stage.bending > 0:
        loss = loss + stage.bending * jnp.sum(jax.vmap(spec.regularizer)(eff))
    # An empty sample overlap with finite parameters: the group drifted apart (status 2).
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(eff)]))
    return loss, (state, finite & (jnp.sum(weights[idx]) == 0))


def _draw(level: _Level, dtype, step_seed) -> _Draw:
    """The voxel sample of one step (a fixed count, ``sample_rate`` of the level grid) and its
    jitter offsets in mm."""
    stage, grid = level.stage, level.grid
    d, v = grid.ndim, grid.size
    samples = max(1, int(round(stage.sample_rate * v)))
    idx = xrandom.randint(step_seed, (samples,), v)
    offset = jnp.zeros((samples, d), dtype)
    if stage.jitter > 0:
        offset = stage.jitter * (2.0 * xrandom.uniform(xrandom.fold(step_seed, 1), (samples, d), dtype) - 1.0)
        offset = apply_linear(offset, jnp.asarray(grid.matrix[:d, :d], dtype))
    return _Draw(idx, offset)


def _level_seed(seed, loop: int):
    """The seed of the ``loop``-th (stage, level) loop of a registration."""
    return xrandom.fold(seed, 1000 + loop)


def _run_level(level: _Level, images, mask, ranges, frozen_params, params, state, seed, offset):
    TRACES["level"] += 1
    tx = _optimizer(level.stage)
    x = grid_points(level.grid, images.dtype).reshape(level.grid.size, level.grid.ndim)
    loss_fn = functools.partial(_step_loss, level, images, mask, ranges, x, frozen_params)
    # The sample is drawn one step ahead and carried through the loop, so it is materialised once:
    # drawn inside the step, XLA:CPU fuses the hash into every gather that reads the sample and
    # recomputes it per element (about half of a step's time on a 10 x 256^2 group).
    draw = functools.partial(_draw, level, images.dtype)

    def step(carry: _Carry, i):
        (loss, (state, emptied)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            carry.params, carry.state, carry.draw)
        updates, opt_state = tx.update(grads, carry.opt_state, carry.params)
        params = optax.apply_updates(carry.params, updates)
        if level.progress is not None:
            total = level.total_steps
            jax.debug.callback(lambda s, l: level.progress(int(s), total, float(l)), offset + i + 1, loss)
        return _Carry(params, opt_state, state, draw(xrandom.fold(seed, i + 1))), (loss, emptied)

    carry = _Carry(params, tx.init(params), state, draw(xrandom.fold(seed, 0)))
    carry, (losses, emptied) = jax.lax.scan(step, carry, jnp.arange(level.stage.iterations))
    return carry.params, carry.state, losses, jnp.any(emptied)


class StepProblem(NamedTuple):
    """One registration step as :func:`register` differentiates it (see :func:`step_problem`).

    Attributes:
      loss: ``loss(params, state, drawn) -> (loss, (state, emptied))``; the loss is
        ``-similarity + bending``; ``jax.value_and_grad(loss, has_aux=True)`` is a step's gradient.
      params: the group's transform parameters at identity, leading axis ``N``.
      state: the objective's state before the first step.
      drawn: the first step's voxel sample.
    """

    loss: Callable
    params: Any
    state: Any
    drawn: _Draw


def step_problem(images, grid: Grid, config: Config, *, key, mask=None) -> StepProblem:
    """The first step of ``config``'s first stage at full resolution, for measuring a step apart
    from the loop (its time, memory and saved activations). With one stage of one pyramid level,
    it is exactly the first step of ``register(images, grid, config, key=key, mask=mask)``.

    Args:
      images: ``(N, *grid.shape)`` images on ``grid``.
      grid: the common grid.
      config: the registration settings; only the first stage is used.
      key: a ``jax.random`` key (posterior initialisation and the voxel sample).
      mask: optional ``(*grid.shape)`` voxel weights.
    """
    images = jnp.asarray(images)
    n = images.shape[0]
    stage = config.stages[0]
    stage = dataclasses.replace(stage, transform=stage.transform.bind(grid))
    level = _Level(stage, grid, (), config.metric, config.mode, config.reference, None, stage.iterations)
    flat = images.reshape(n, -1)
    mask = jnp.ones(grid.size, images.dtype) if mask is None else jnp.asarray(mask, images.dtype).reshape(-1)
    x = grid_points(grid, images.dtype).reshape(grid.size, grid.ndim)
    ranges = intensity_ranges(flat, config.intensity_range)
    images, flat = _clip(images, ranges), _clip(flat, ranges)
    loss = functools.partial(_step_loss, level, images, mask, ranges, x, ())
    return StepProblem(loss, _stack(stage.transform.identity(), n), config.metric.init(key, flat, mask),
                       _draw(level, images.dtype, xrandom.fold(_level_seed(xrandom.seed(key), 0), 0)))


# ---- the entry point -----------------------------------------------------------------------------

def intensity_ranges(flat, percentiles: tuple[float, float]):
    """Each image's Parzen range ``(lo, hi)``, each ``(N,)``, from ``flat`` ``(N, V)``: the
    ``percentiles`` of its intensities (:attr:`xjax.Config.intensity_range`); ``(0, 100)`` is the
    exact min / max."""
    if tuple(percentiles) == (0.0, 100.0):
        return flat.min(axis=1), flat.max(axis=1)
    lo, hi = jnp.percentile(flat, jnp.asarray(percentiles, flat.dtype), axis=1)
    return lo, hi


def _clip(images, ranges):
    """``(N, ...)`` images clipped to their ranges ``(lo, hi)``, each ``(N,)``."""
    lo, hi = (r.reshape((-1,) + (1,) * (images.ndim - 1)) for r in ranges)
    return jnp.clip(images, lo, hi)


def _stack(tree, n):
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), tree)


def register(images, grid: Grid | None = None, config: Config | None = None, *, key,
             mask=None, labels=None, progress: Callable[[int, int, float], None] | None = None) -> Result:
    """Groupwise registration of ``N`` images by X-CoReg (Algorithm 1).

    Args:
      images: ``(N, *spatial)``, ``N >= 2`` images on one common grid (see
        :func:`xjax.resample.to_common_space` for images on different grids). Intensities in any units:
        each image is binned over its own range.
      grid: the common grid (default ``Grid.regular(spatial)``, 1 mm voxels).
      config: stages and model (default ``xjax.presets.rigid_ffd()``).
      key: a ``jax.random`` key: posterior initialisation (k-means starts, or Eq. 22) and voxel
        sampling.
      mask: optional ``(*spatial)`` voxel weights in the common space (e.g. a foreground mask).
      labels: optional ``(N, *spatial)`` label maps of the images in their own (unwarped) space,
        values in ``[0, K)``: X-Reg-GT, with the appearance models fixed by Eq. (48).
      progress: optional ``progress(done_steps, total_steps, loss)``, called from inside the loop.

    Returns:
      :class:`Result`. Numerical failure is reported in ``Result.status``, not raised.
    """
    images = jnp.asarray(images)
    validate.check_images(images)  # before any cast: a complex image is refused, not truncated
    if not jnp.issubdtype(images.dtype, jnp.floating):
        images = images.astype(jnp.float32)
    n, spatial = images.shape[0], images.shape[1:]
    grid = Grid.regular(spatial) if grid is None else grid
    if grid.shape != spatial:
        raise ValueError(f"grid shape {grid.shape} does not match images of shape {images.shape}")
    thin = [a for a, size in enumerate(spatial) if size < 4]
    if thin:
        raise ValueError(f"images of shape {tuple(spatial)} are too thin along axis {thin}: registration "
                         "needs at least 4 voxels along every axis (a 2D image is (X, Y), or (X, Y, 1) "
                         "in a NIfTI file)")
    config = presets.rigid_ffd() if config is None else config
    if config.mode == "reference" and not 0 <= config.reference < n:
        raise ValueError(f"reference image {config.reference} out of range for a group of {n}")
    if mask is None:
        mask = jnp.ones(spatial, images.dtype)
    else:
        mask = jnp.asarray(mask, images.dtype)
        validate.check_mask(mask, spatial)
    if labels is not None:
        labels = jnp.asarray(labels)
        validate.check_labels(labels, images.shape)
        if labels.shape != images.shape:
            raise ValueError(f"labels need one map per image, shape {images.shape}, got {labels.shape}")
        if not isinstance(config.metric, XMetric):
            raise ValueError(f"labels (X-Reg-GT) need the X-metric objective, got {config.metric!r}")
        k = config.metric.num_classes
        if not isinstance(labels, jax.core.Tracer) and int(labels.max()) >= k:
            raise ValueError(f"labels hold value {int(labels.max())} but num_classes is {k}")

    return _register(config, grid, progress, images, mask, labels, key)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _register(config: Config, grid: Grid, progress, images, mask, labels, key) -> Result:
    """The whole registration as one XLA program; each (stage, level) loop is traced once."""
    n = images.shape[0]
    levels_needed = max(s.levels for s in config.stages)
    image_pyramid = pyramid(jnp.moveaxis(images, 0, -1), grid, levels_needed)
    mask_pyramid = pyramid(mask, grid, levels_needed)

    seed = xrandom.seed(key)
    objective = config.metric
    frozen, frozen_params, history, overlap_lost = (), (), [], jnp.asarray(False)
    state, state_grid = None, None
    for stage in config.stages:
        spec = stage.transform.bind(grid)
        stage = dataclasses.replace(stage, transform=spec)
        params = _stack(spec.identity(), n)
        for level_index in reversed(range(stage.levels)):
            level_images, level_grid = image_pyramid[level_index]
            level_images = jnp.moveaxis(level_images, -1, 0)
            flat = level_images.reshape(n, -1)
            level_mask = mask_pyramid[level_index][0].reshape(-1)
            ranges = intensity_ranges(flat, config.intensity_range)
            level_images, flat = _clip(level_images, ranges), _clip(flat, ranges)
            if state is None:
                state = objective.init(key, flat, level_mask)
            else:
                state = objective.to_grid(state, state_grid, level_grid)
            state_grid = level_grid
            if labels is not None:
                state = state._replace(tables=_label_tables(labels, grid, level_grid, flat, level_mask,
                                                            ranges, objective.num_classes, stage.bins))
            level = _Level(stage, level_grid, frozen, objective, config.mode, config.reference,
                           progress, config.total_steps)
            params, state, losses, emptied = _run_level(
                level, level_images, level_mask, ranges, frozen_params, params, state,
                _level_seed(seed, len(history)), sum(h.size for h in history))
            history.append(losses)
            overlap_lost = overlap_lost | emptied
        frozen = frozen + (spec,)
        frozen_params = frozen_params + (_effective(level, params),)

    return _finish(config, grid, images, mask.reshape(-1), labels, frozen, frozen_params, state,
                   state_grid, jnp.concatenate(history), overlap_lost)


def _label_tables(labels, grid, level_grid, flat, level_mask, ranges, k, bins):
    """X-Reg-GT appearance tables at one level: labels read by nearest neighbour on the level grid."""
    idx = grid.world_to_index(grid_points(level_grid)).reshape(-1, grid.ndim)
    level_labels = jax.vmap(lambda lab: sample(lab, idx, order=0))(labels)
    return jax.vmap(appearance_from_labels, in_axes=(0, 0, None, 0, 0, None, None))(
        flat, level_labels.astype(jnp.int32), k, ranges[0], ranges[1], bins, level_mask)


def _finish(config, grid, images, mask, labels, specs, params, state, state_grid, history,
            overlap_lost) -> Result:
    """Full-resolution displacements, warped images and, for the X-metric, a last E-step at the
    final transforms; ``overlap_lost`` is true when some step's sample had no overlap voxel."""
    n, v = images.shape[0], grid.size
    disp = _displacements(specs[-1], specs[:-1], params[:-1], params[-1], grid)
    points = grid_points(grid, images.dtype).reshape(1, v, grid.ndim) + disp.reshape(n, v, grid.ndim)
    warped, inside = _warp_group(images, grid, points)
    posterior = pi = None
    objective = config.metric
    if isinstance(objective, XMetric):
        weights = mask * jnp.prod(inside, axis=0)
        ranges = intensity_ranges(images.reshape(n, -1), config.intensity_range)
        flat = _clip(images.reshape(n, -1), ranges)
        bins = config.stages[-1].bins
        state = objective.to_grid(state, state_grid, grid)
        if labels is not None:
            state = state._replace(tables=_label_tables(labels, grid, grid, flat, mask, ranges,
                                                        objective.num_classes, bins))
        em = objective.update(state, _clip(warped, ranges), weights, *ranges, bins, None).em
        posterior, pi = em.posterior.reshape(grid.shape + (objective.num_classes,)), em.pi
    finite = jnp.all(jnp.isfinite(history)) & jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(params)]))
    quality = _quality(disp, grid, mask)
    folded = jnp.any(quality.folded_fraction > 0)
    status = jnp.where(overlap_lost, 2, jnp.where(finite, jnp.where(folded, 3, 0), 1))
    return Result(
        params=tuple(params),
        displacements=disp,
        warped=warped.reshape(images.shape),
        posterior=posterior,
        pi=pi,
        loss_history=history,
        status=status.astype(jnp.int32),
        quality=quality,
    )


def _quality(disp, grid: Grid, mask) -> Quality:
    """:class:`Quality` of the group's displacements ``(N, *grid.shape, D)`` over the voxels where
    the flat ``mask`` ``(V,)`` is positive."""
    n, d = disp.shape[0], grid.ndim
    det = jax.vmap(jacobian_determinant, in_axes=(0, None))(disp, grid).reshape(n, -1)
    length = jnp.sqrt(jnp.sum(jnp.square(disp.reshape(n, -1, d)), axis=-1))
    region = mask > 0
    count = jnp.maximum(jnp.sum(region), 1).astype(disp.dtype)
    return Quality(
        jacobian_min=jnp.min(jnp.where(region, det, jnp.inf), axis=1),
        folded_fraction=jnp.sum(region & (det <= 0), axis=1) / count,
        movement_mean=jnp.sum(jnp.where(region, length, 0.0), axis=1) / count,
        movement_p99=jnp.nanpercentile(jnp.where(region, length, jnp.nan), 99.0, axis=1),
    )
