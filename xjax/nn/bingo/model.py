"""BInGo: groupwise registration by hierarchical disentanglement (a hierarchical VAE).

The model of the BInGo paper (Sec. 2.1-2.4, Fig. 1-3): a group ``x = (x_m)`` of ``M`` images of
any modalities on one grid is explained by a common structure ``z = (z^l)`` and stationary
velocity fields ``v_m = (v^l_m)`` over ``L`` levels (level 1 coarsest, level ``L`` full
resolution). The inference model runs in three steps:

I. bottom-up velocities: shared encoders give multi-level structural representations ``c^l_m``
   (diagonal Gaussians); at level ``l`` each is warped by the coarser deformation ``phi^<l_m``,
   the group's warped experts are fused by their normalised geometric mean (Eq. 5), and a Reg
   module infers ``q(v^l_m | x, v^<l)`` from that mean concatenated with the image's own warped
   representation; ``phi^l_m = exp(v^l_m)`` by scaling and squaring; ``phi_m = phi^1_m o ... o
   phi^L_m``.
II. top-down structure: the warped images ``x_m o phi_m`` are encoded again into the experts
   ``q_m(z^l | x_m, v_m)``; the posterior ``q(z^l | x, v)`` is their geometric mean (Eq. 4-5), the
   prior ``p(z^l | z^<l)`` their arithmetic mean, and their KL is bounded by Eq. 6.
III. auto-encoding: decoders with modality-specific appearance parameters map a sample of ``z``
   to each registered image ``x_hat_m``, which the inverse deformation ``phi_m^-1`` takes back to
   the original image's space for the L1 reconstruction term.

Conventions (:mod:`xjax.grid`): images ``(M, *spatial)`` indexed ``(x, y[, z])``; feature maps
channels-last ``(M, *spatial_l, C)``; displacements ``(M, *spatial, D)`` in world mm, pulling
from the common space into each image: the registered image is ``x_m(x + u_m(x))``.

Choices the paper leaves open, made here:

* Levels: level ``l`` lives on ``grid.downsample(2 ** (L - l))`` (level ``L`` on the image grid).
  The encoder's strided convolutions place coarse voxels up to half a fine voxel away from those
  grid centres; that shift is common to every image and so does not bias the alignment.
* Encoder: :class:`xjax.nn.blocks.Encoder` (shared convolutions, one normalisation parameter set
  per modality) and a :class:`xjax.nn.blocks.Decoder` (U-Net up-path), whose level-``l`` output
  gives the expert's mean and log-variance by a 3^D convolution. Normalisation uses instance
  statistics instead of the paper's domain-specific batch normalisation: batch statistics would
  couple the images of a group and of a chunk, and chunked inference would differ from one pass.
* Log-variances are bounded smoothly, ``logvar = B tanh(raw / B)`` with ``B = 8``.
* Reg module: a residual block and a 3^D convolution on ``[mu, logvar]`` of the warped geometric
  mean and of the image's own warped expert (``4 C`` channels), giving the velocity's mean and
  log-variance in voxels of the level (converted to mm by the level grid). The mean head starts
  at zero (identity deformations), the log-variance head at ``-6``.
* Warping of feature maps and images: the values of :func:`xjax.warp.warp`, linear interpolation,
  border-extended. Coarser displacements are carried to finer levels by
  linear resampling (:func:`xjax.transforms.dense.resample_field`) and composed by
  :func:`xjax.evaluate.compose_displacements`.
* ``phi_m^-1 = exp(-v^L_m) o ... o exp(-v^1_m)``, each level integrated on its own grid.
* Velocity prior and KL: the Laplacian prior of the paper's reference [5]
  (:func:`xjax.nn.bingo.losses.velocity_kl`), in voxels of each level.
* Sampling: one reparameterised sample of each ``v^l_m`` and ``z^l`` per step in training; the
  posterior means (MAP) at inference.
* ELBO weights (:class:`xjax.nn.bingo.losses.ElboWeights`): the L1 term is read as a Laplace
  likelihood of scale ``b = 0.05`` of the [0, 1] intensity range (``lambda_1 = 20``), with
  ``lambda_2 = 2`` and ``lambda_3 = 1``. With ``b = 1`` the experts carry only smooth outlines
  and the group is warped towards one of them; with cheap deformations (``lambda_2`` small next
  to ``lambda_1``) the model reconstructs each image through its own deformation instead of
  aligning the group.
* Decoder (generative): a U-Net up-path from ``z^1`` through ``z^2 .. z^L`` with one
  normalisation parameter set per modality (the appearance parameters) and a 1^D convolution to
  one channel.
* Group-mean centring (the paper does not mention one): at every level the group mean of the
  velocity means is subtracted, ``v^l_m <- v^l_m - mean_m' v^l_m'``, so that the common space
  stays at the group's centre (the log-domain analogue of Eq. 37 of the X-metric paper).
  Without it nothing but the weak velocity prior fixes the common space, and training found a
  shortcut: one deformation shared by the whole group that magnifies the hard regions of the
  common space lowers both the reconstruction error and the structure KL (on synthetic
  phantoms, below their values at the true alignment) without aligning anything. A group of
  one image is left undeformed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xjax.evaluate import compose_displacements
from xjax.grid import Grid, apply_linear
from xjax.nn import blocks
from xjax.nn.bingo.losses import (ElboWeights, kl_bound, l1_reconstruction, poe_from_sums,
                                  poe_sums, product_of_experts, velocity_kl)
from xjax.transforms.dense import resample_field, scaling_and_squaring
from xjax.warp import warp

__all__ = [
    "BInGo",
    "BingoConfig",
    "Outputs",
    "Registration",
    "check_group",
    "create",
    "forward",
    "integrate",
    "level_grids",
    "loss_terms",
    "register_group",
]

_LOGVAR_BOUND = 8.0
_VELOCITY_LOGVAR_INIT = -6.0


@dataclasses.dataclass(frozen=True)
class BingoConfig:
    """Static architecture of a BInGo model.

    Attributes:
      ndim: 2 or 3 spatial dimensions.
      num_modalities: number of modality-specific parameter sets (modality indices ``0 .. n-1``).
      features: encoder widths per level, finest first; ``L = len(features)`` levels.
      latent: channels ``C`` of each level's structural representation ``z^l``.
      reg_features: width of each Reg module.
      decoder_features: widths of the generative decoder per level, finest first.
      svf_steps: squarings of the scaling-and-squaring integration.
    """

    ndim: int = 2
    num_modalities: int = 3
    features: tuple[int, ...] = (8, 16, 32)
    latent: int = 4
    reg_features: int = 16
    decoder_features: tuple[int, ...] = (8, 16, 16)
    svf_steps: int = 6

    def __post_init__(self):
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "decoder_features", tuple(self.decoder_features))
        if self.ndim not in (2, 3):
            raise ValueError(f"BingoConfig.ndim must be 2 or 3, got {self.ndim!r}")
        for name in ("num_modalities", "latent", "reg_features"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"BingoConfig.{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not self.features or any(not isinstance(f, int) or f < 1 for f in self.features):
            raise ValueError(f"BingoConfig.features must be positive ints, got {self.features!r}")
        if len(self.decoder_features) != len(self.features) or any(
                not isinstance(f, int) or f < 1 for f in self.decoder_features):
            raise ValueError(f"BingoConfig.decoder_features must be {len(self.features)} positive "
                             f"ints, got {self.decoder_features!r}")
        if not isinstance(self.svf_steps, int) or self.svf_steps < 0:
            raise ValueError(f"BingoConfig.svf_steps must be an int >= 0, got {self.svf_steps!r}")

    @property
    def levels(self) -> int:
        return len(self.features)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BingoConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _bound(raw):
    return _LOGVAR_BOUND * jnp.tanh(raw / _LOGVAR_BOUND)


class _Reg(nnx.Module):
    """Reg module of one level: ``[common, own] (B, *s, 4C) -> velocity mean, logvar (B, *s, D)``
    in voxels of the level."""

    def __init__(self, config: BingoConfig, *, rngs: nnx.Rngs):
        d = config.ndim
        self.block = blocks.ResidualBlock(4 * config.latent, config.reg_features, ndim=d, rngs=rngs)
        self.mean = nnx.Conv(config.reg_features, d, (3,) * d, rngs=rngs)
        self.logvar = nnx.Conv(config.reg_features, d, (3,) * d, rngs=rngs)

    def __call__(self, x):
        h = self.block(x)
        return self.mean(h), _bound(self.logvar(h))


class BInGo(nnx.Module):
    """The networks of BInGo (Fig. 2): structural encoder, ``L`` Reg modules and the decoder.

    Build it with :func:`create`; call the pure functions :func:`forward` and
    :func:`register_group` with it. Its methods work on batches of images ``(B, *spatial)`` with
    modality indices ``(B,)``.
    """

    def __init__(self, config: BingoConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, n, f, c = config.ndim, config.num_modalities, config.features, config.latent
        self.encoder = blocks.Encoder(1, f, ndim=d, num_modalities=n, rngs=rngs)
        self.upward = blocks.Decoder(f[-1], f, f, ndim=d, num_modalities=n, rngs=rngs)
        self.heads = nnx.List([nnx.Conv(w, 2 * c, (3,) * d, rngs=rngs) for w in f[::-1]])
        self.reg = nnx.List([_Reg(config, rngs=rngs) for _ in f])
        self.generator = blocks.Decoder(c, (c,) * len(f), config.decoder_features, ndim=d,
                                        num_modalities=n, rngs=rngs)
        self.output = nnx.Conv(config.decoder_features[0], 1, (1,) * d, rngs=rngs)

    def encode(self, images, modality):
        """Structural representations ``c^l`` of ``images`` ``(B, *spatial)``: a list over levels,
        coarsest first, of ``(mu, logvar)``, each ``(B, *spatial_l, C)``."""
        features = self.encoder(images[..., None], modality)
        up = self.upward(features[-1], features, modality)[::-1]
        out = []
        for head, h in zip(self.heads, up):
            mu, raw = jnp.split(head(h), 2, axis=-1)
            out.append((mu, _bound(raw)))
        return out

    def velocity(self, level: int, common, own):
        """``q(v^l | x, v^<l)``: common and own are ``(mu, logvar)`` pairs ``(B, *s_l, C)``;
        returns mean and log-variance ``(B, *s_l, D)`` in voxels of level ``level`` (0-based)."""
        return self.reg[level](jnp.concatenate([*common, *own], axis=-1))

    def decode(self, z, modality):
        """``x_hat = f_m(z)``: ``z`` a coarsest-first list of ``(B, *s_l, C)``; ``(B, *spatial)``."""
        h = self.generator(z[0], z[::-1], modality)[0]
        return self.output(h)[..., 0]


def create(config: BingoConfig, seed: int = 0) -> BInGo:
    """A freshly initialised model (:func:`xjax.nn.blocks.build`, a deterministic function of
    ``seed``), with zero velocity heads (every deformation starts at the identity) and the
    velocity log-variance starting at ``-6``."""
    model = blocks.build(lambda rngs: BInGo(config, rngs=rngs), seed)
    for reg in model.reg:
        for head in (reg.mean, reg.logvar):
            head.kernel[...] = jnp.zeros_like(head.kernel[...])
        reg.logvar.bias[...] = jnp.full_like(reg.logvar.bias[...], _VELOCITY_LOGVAR_INIT)
    return model


def level_grids(grid: Grid, levels: int) -> tuple[Grid, ...]:
    """The grids of the hierarchy, coarsest first: level ``l`` (0-based) is
    ``grid.downsample(2 ** (levels - 1 - l))``."""
    return tuple(grid.downsample(2 ** (levels - 1 - l)) for l in range(levels))


def check_group(config: BingoConfig, images, modalities, grid: Grid) -> None:
    """Raise ValueError unless ``images`` ``(M, *grid.shape)`` and ``modalities`` ``(M,)`` fit
    ``config`` (shapes always; modality values where they are concrete)."""
    if grid.ndim != config.ndim:
        raise ValueError(f"grid {grid} is {grid.ndim}D but the model is {config.ndim}D")
    if images.ndim != grid.ndim + 1 or tuple(images.shape[1:]) != grid.shape:
        raise ValueError(f"images must be (M, *{grid.shape}), got shape {images.shape}")
    if modalities.shape != images.shape[:1]:
        raise ValueError(f"modalities must be ({images.shape[0]},), got shape {modalities.shape}")
    if images.shape[0] < 1:
        raise ValueError("a group needs at least one image")
    if not isinstance(modalities, jax.core.Tracer):
        m = np.asarray(modalities)
        if m.min() < 0 or m.max() >= config.num_modalities:
            raise ValueError(f"modalities must lie in [0, {config.num_modalities}), got {m.tolist()}")


def _pull(image, displacement, grid: Grid):
    """``image(x + u(x))`` at the voxel centres of ``grid``: the values of :func:`xjax.warp.warp`
    (linear, border-extended; ``image`` ``(*grid.shape[, C])``, ``displacement`` in mm)."""
    return warp(image, displacement, grid)[0]


def _to_mm(velocity, grid: Grid):
    return apply_linear(velocity, jnp.asarray(grid.matrix[:-1, :-1], velocity.dtype))


def _sample(mu, logvar, key):
    if key is None:
        return mu
    return mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape, mu.dtype)


def _carry_down(u_prev, coarse: Grid, fine: Grid):
    """Group displacements ``(B, *coarse.shape, D)`` resampled to ``fine``."""
    return jax.vmap(lambda u: resample_field(u, coarse, fine))(u_prev)


def _warp_own(own, u_prev, grids, level: int):
    """Step I's ``c^l_m o phi^<l_m``: warp the experts ``(mu, logvar)`` ``(B, *s_l, C)`` of level
    ``level`` by the coarser displacements ``u_prev`` (on the previous level's grid; ``None`` at
    the coarsest level). Returns the warped pair and ``u_prev`` resampled to this level."""
    if u_prev is None:
        return own, None
    grid = grids[level]
    u_up = _carry_down(u_prev, grids[level - 1], grid)
    warp_all = jax.vmap(_pull, in_axes=(0, 0, None))
    return tuple(warp_all(e, u_up, grid) for e in own), u_up


def integrate(v, grid: Grid, steps: int):
    """``phi = exp(v)`` (paper Sec. 2.1, ``d phi / dt = v(phi)`` up to ``t = 1``) for a batch of
    stationary velocities, by :func:`xjax.transforms.dense.scaling_and_squaring`.

    Args:
      v: ``(B, *grid.shape, D)`` velocities in voxels of ``grid`` per unit time.
      grid: the grid the velocities live on.
      steps: number of squarings.

    Returns:
      ``phi - id``, ``(B, *grid.shape, D)`` in mm.
    """
    return jax.vmap(lambda a: scaling_and_squaring(_to_mm(a, grid), grid, steps))(v)


def _velocity_mean(model: BInGo, level: int, warped, common):
    """Step I's Reg module at one level for a batch: ``q(v^l_m | x, v^<l)`` before centring,
    ``(mu, logvar)`` each ``(B, *s_l, D)`` in voxels of the level, from the warped own experts
    ``(B, *s_l, C)`` and the group's (partially) common structure ``(*s_l, C)``."""
    b = warped[0].shape[0]
    common = tuple(jnp.broadcast_to(c, (b,) + c.shape) for c in common)
    return model.velocity(level, common, warped)


def _deform(v_mu, v_logvar, grid: Grid, u_up, key, steps: int, inverse: bool = False):
    """A sample of ``q(v^l_m)`` (or its mean, ``key=None``), its exponential and the composition
    ``phi^<l o phi^l``.

    Args:
      v_mu, v_logvar: ``(B, *grid.shape, D)`` centred velocity means and log-variances (voxels);
        ``v_logvar`` is not read when ``key`` is None.
      grid: the level's grid.
      u_up: ``phi^<l - id`` resampled to ``grid``, ``(B, *grid.shape, D)`` mm, or None.
      key: PRNG key or None.
      steps: squarings.
      inverse: also return ``exp(-v^l) - id``, integrated in the same batch as ``exp(v^l)``.

    Returns:
      ``(u, w)``: ``phi^<=l - id`` on ``grid`` in mm and ``exp(-v^l) - id`` (or None).
    """
    v = _sample(v_mu, v_logvar, key)
    w = None
    if inverse:
        u, w = jnp.split(integrate(jnp.concatenate([v, -v]), grid, steps), 2)
    else:
        u = integrate(v, grid, steps)
    if u_up is not None:
        u = jax.vmap(compose_displacements, in_axes=(0, 0, None))(u_up, u, grid)
    return u, w


def _inverse(level_inverses, grids):
    """``phi^-1 - id`` on the finest grid, ``exp(-v^L) o ... o exp(-v^1)``, from the levels'
    ``exp(-v^l) - id`` (coarsest first, each ``(B, *s_l, D)`` mm on its grid).

    Each level's field is carried to the finest grid level by level, through the same chain of
    linear resamplings that carries ``exp(v^l)`` inside ``phi`` (:func:`forward`). One direct
    resampling differs from that chain by an interpolation error that grows with the field's
    roughness: on the random velocity fields of the tests, a quarter of the displacement."""
    total = None
    for l, w in enumerate(level_inverses):
        for coarse, fine in zip(grids[l:-1], grids[l + 1:]):
            w = _carry_down(w, coarse, fine)
        total = w if total is None else jax.vmap(compose_displacements, in_axes=(0, 0, None))(
            w, total, grids[-1])
    return total


class Outputs(NamedTuple):
    """Everything :func:`forward` computes for one group of ``M`` images (levels coarsest first).

    Attributes:
      displacement: ``phi_m - id``, ``(M, *spatial, D)`` mm.
      inverse: ``phi_m^-1 - id``, ``(M, *spatial, D)`` mm.
      warped: registered images ``x_m o phi_m``, ``(M, *spatial)``.
      reconstruction: ``x_hat_m`` in the common space, ``(M, *spatial)``.
      reconstruction_original: ``x_hat_m o phi_m^-1``, ``(M, *spatial)``.
      velocity: per level ``(mu, logvar)`` of ``q(v^l_m)``, ``(M, *s_l, D)`` voxels.
      experts: per level ``(mu, logvar)`` of ``q_m(z^l)``, ``(M, *s_l, C)``.
      common: per level ``(mu, logvar)`` of ``q(z^l | x, v)``, ``(*s_l, C)``.
    """

    displacement: jax.Array
    inverse: jax.Array
    warped: jax.Array
    reconstruction: jax.Array
    reconstruction_original: jax.Array
    velocity: tuple
    experts: tuple
    common: tuple


def forward(model: BInGo, images, modalities, grid: Grid, key=None) -> Outputs:
    """The inference and generative model of Fig. 1(b)/2 on one group, in one pass.

    Args:
      model: the networks.
      images: ``(M, *grid.shape)`` intensities (normalised, e.g. to [0, 1]).
      modalities: ``(M,)`` int modality indices.
      grid: the common grid (world mm); level ``l`` has ``ceil(n / 2 ** (L - l))`` voxels per
        axis.
      key: PRNG key for the reparameterised samples of ``v`` and ``z``; ``None`` uses the
        posterior means (MAP inference).

    Returns:
      :class:`Outputs`.
    """
    check_group(model.config, images, modalities, grid)
    levels = model.config.levels
    grids = level_grids(grid, levels)
    keys = [None] * (2 * levels) if key is None else list(jax.random.split(key, 2 * levels))
    own = model.encode(images, modalities)
    u, velocity, inverses = None, [], []
    for l in range(levels):
        warped, u_up = _warp_own(own[l], u, grids, l)
        common = product_of_experts(*warped)
        v_mu, v_logvar = _velocity_mean(model, l, warped, common)
        v_mu = v_mu - jnp.mean(v_mu, axis=0)
        u, w = _deform(v_mu, v_logvar, grids[l], u_up, keys[l], model.config.svf_steps,
                       inverse=True)
        velocity.append((v_mu, v_logvar))
        inverses.append(w)
    warped = jax.vmap(_pull, in_axes=(0, 0, None))(images, u, grid)
    experts = model.encode(warped, modalities)
    common = [product_of_experts(mu, logvar) for mu, logvar in experts]
    z = [jnp.broadcast_to(_sample(mu, lv, k), (images.shape[0],) + mu.shape)
         for (mu, lv), k in zip(common, keys[levels:])]
    reconstruction = model.decode(z, modalities)
    inverse = _inverse(inverses, grids)
    original = jax.vmap(_pull, in_axes=(0, 0, None))(reconstruction, inverse, grid)
    return Outputs(u, inverse, warped, reconstruction, original, tuple(velocity), tuple(experts),
                   tuple(common))


def loss_terms(outputs: Outputs, images, weights: ElboWeights):
    """The negative ELBO (Eq. 2-3, 6) of one group and its terms.

    Returns:
      ``(loss, terms)``: a scalar and a dict of scalars ``reconstruction`` (L1, Eq. 2's first
      term), ``velocity_kl`` (Eq. 3 i, per voxel and image, summed over levels) and
      ``structure_kl`` (the Eq. 6 bound, per voxel, summed over levels).
    """
    recon = l1_reconstruction(images, outputs.reconstruction_original)
    kl_v = sum(jnp.mean(jax.vmap(velocity_kl, in_axes=(0, 0, None))(mu, lv, weights.smoothness))
               for mu, lv in outputs.velocity)
    kl_z = sum(jnp.mean(kl_bound(mu, lv)) for mu, lv in outputs.experts)
    loss = (weights.reconstruction * recon + weights.velocity * kl_v
            + weights.structure * kl_z)
    return loss, {"reconstruction": recon, "velocity_kl": kl_v, "structure_kl": kl_z}


class Registration(NamedTuple):
    """Result of :func:`register_group` for ``N`` images (MAP velocities).

    Attributes:
      displacement: ``phi_m - id``, ``(N, *spatial, D)`` in mm (pull from the common space).
      warped: ``x_m o phi_m``, ``(N, *spatial)``.
      common: per level, coarsest first, the mean of ``q(z^l | x, v)``, ``(*s_l, C)``.
    """

    displacement: jax.Array
    warped: jax.Array
    common: tuple


def _chunks(x, chunk: int):
    """``(N, ...)`` -> ``(ceil(N / chunk), chunk, ...)``, zero-padded."""
    pad = -x.shape[0] % chunk
    x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    return x.reshape((-1, chunk) + x.shape[1:])


def _accumulate(fn, xs):
    """Sum of ``fn(chunk)`` (a pytree) over the leading chunk axis of the pytree ``xs``."""
    shapes = jax.eval_shape(fn, jax.tree.map(lambda a: a[0], xs))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jax.lax.scan(lambda total, c: (jax.tree.map(jnp.add, total, fn(c)), None), zeros, xs)[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "grid", "chunk"))
def _register_chunked(graphdef, state, images, modalities, grid: Grid, chunk: int):
    model = nnx.merge(graphdef, state)
    n = images.shape[0]
    grids = level_grids(grid, model.config.levels)
    x, m = _chunks(images, chunk), _chunks(modalities, chunk)
    w = _chunks(jnp.ones((n,), images.dtype), chunk)
    u = None
    for l in range(model.config.levels):
        def warped_own(c, l=l):
            return _warp_own(model.encode(c["x"], c["m"])[l], c["u"], grids, l)

        data = {"x": x, "m": m, "w": w, "u": u}
        common = poe_from_sums(*_accumulate(lambda c: poe_sums(*warped_own(c)[0], c["w"]), data))

        def velocity(c, l=l, common=common):
            return _velocity_mean(model, l, warped_own(c)[0], common)[0]

        mean = _accumulate(lambda c: jnp.einsum("b,b...->...", c["w"], velocity(c)), data) / n

        def step(c, l=l, common=common, mean=mean):
            warped, u_up = warped_own(c)
            v_mu = _velocity_mean(model, l, warped, common)[0] - mean
            return _deform(v_mu, None, grids[l], u_up, None, model.config.svf_steps)[0]

        u = jax.lax.map(step, data)
    warped = jax.vmap(jax.vmap(_pull, in_axes=(0, 0, None)), in_axes=(0, 0, None))(x, u, grid)
    sums = _accumulate(lambda c: [poe_sums(*e, c["w"]) for e in model.encode(c["x"], c["m"])],
                       {"x": warped, "m": m, "w": w})
    unchunk = lambda a: a.reshape((-1,) + a.shape[2:])[:n]
    return Registration(unchunk(u), unchunk(warped), tuple(poe_from_sums(*s)[0] for s in sums))


def register_group(model: BInGo, images, modalities, grid: Grid, *, chunk: int = 64) -> Registration:
    """Register a group of any size with a trained model, ``chunk`` images at a time.

    The geometric mean of Eq. 5 needs only the sums of the experts' precisions and
    precision-weighted means, and the group centring only the sum of the velocities, so each
    level makes three passes over the chunks (sum the experts, sum the velocities, then infer
    the centred velocities); memory grows with ``chunk``, not with ``N``, apart from the ``N``
    displacement fields themselves. The result equals :func:`forward` with ``key=None``.

    Args:
      model: trained networks.
      images: ``(N, *grid.shape)`` normalised intensities, ``N >= 1``.
      modalities: ``(N,)`` int modality indices.
      grid: the common grid.
      chunk: images per chunk (static; the last chunk is padded with zero-weight images).

    Returns:
      :class:`Registration`.
    """
    images = jnp.asarray(images, jnp.float32)
    modalities = jnp.asarray(modalities, jnp.int32)
    check_group(model.config, images, modalities, grid)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    chunk = min(chunk, images.shape[0])
    graphdef, state = nnx.split(model)
    return _register_chunked(graphdef, state, images, modalities, grid, chunk)
