"""The terms of BInGo's evidence lower bound (paper Eq. 2-6), as pure functions of arrays.

Every Gaussian here is diagonal: a mean and a log-variance of the same shape, one independent
normal per voxel and channel. Group axes come first (``(M, ...)`` for the ``M`` experts of one
group); spatial axes and channels follow, channels-last.

The loss minimised in training is the negative ELBO with the weights of paper Sec. 2.3,

    ``loss = lambda_1 * L1 reconstruction + lambda_2 * KL_v (Eq. 3 i) + lambda_3 * KL_z bound (Eq. 6)``

with each term averaged over voxels and images (so the weights do not depend on image size or
group size), summed over channels and over the hierarchy's levels.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

__all__ = [
    "ElboWeights",
    "gaussian_kl",
    "kl_bound",
    "l1_reconstruction",
    "poe_from_sums",
    "poe_sums",
    "product_of_experts",
    "velocity_kl",
]


@dataclasses.dataclass(frozen=True)
class ElboWeights:
    """Weights of the negative ELBO (paper Sec. 2.3) and the velocity prior's precision.

    Attributes:
      reconstruction: ``lambda_1``, weight of the L1 reconstruction of the original images.
      velocity: ``lambda_2``, weight of the velocity KL (Eq. 3 i).
      structure: ``lambda_3``, weight of the common-structure KL bound (Eq. 6).
      smoothness: ``lambda`` of the velocity prior ``p(v) = N(0, (lambda * Lap)^-1)`` (the graph
        Laplacian prior of Dalca et al., the paper's reference [5]), per voxel of each level.

    The paper gives no values. The reconstruction term is the mean absolute error of
    intensities normalised to [0, 1]; as the negative log-likelihood of a Laplace distribution of
    scale ``b`` it is ``|x - x_hat| / b``, so ``lambda_1 = 1 / b``. The defaults, ``b = 0.05`` of the
    intensity range (``lambda_1 = 20``), ``lambda_2 = 2`` and ``lambda_3 = 1``, come from 600-step
    trainings on synthetic phantom groups (48 x 48 at 2 mm, random FFDs of 24 mm spacing and
    +-8 mm, gWI 2.47 mm before registration; ``experiments/bingo_phantoms.py`` runs the full
    comparison):

    * ``1 / 0.1 / 1`` (``b = 1``: the images treated as noise): the experts agreed but carried
      only smooth outlines, and the model warped every image towards one smooth outline instead
      of onto the others (gWI 2.23 mm);
    * ``20 / 0.1 / 1``: deformations were cheap next to the reconstruction, and the model used
      them to reconstruct each image instead of aligning the group (gWI 4.73 mm, worse than
      before);
    * ``20 / 1 / 1``: 2.06 mm after 400 steps; ``20 / 2 / 1``: 1.95 mm after 400 steps and
      1.87 mm after 600 (Adam 3e-3), with experts that keep the tissue boundaries.
    """

    reconstruction: float = 20.0
    velocity: float = 2.0
    structure: float = 1.0
    smoothness: float = 10.0

    def __post_init__(self):
        for name in ("reconstruction", "velocity", "structure", "smoothness"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"ElboWeights.{name} must be a number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))


def poe_sums(mu, logvar, weights=None):
    """Natural-parameter sums of ``M`` diagonal Gaussian experts over the leading axis.

    Args:
      mu, logvar: ``(M, ...)`` means and log-variances.
      weights: optional ``(M,)`` weights in {0, 1} (0 drops an expert: padding of a chunk).

    Returns:
      ``(sum_m w_m / var_m, sum_m w_m mu_m / var_m, sum_m w_m)``: ``(...)``, ``(...)``, scalar.
    """
    precision = jnp.exp(-logvar)
    if weights is None:
        weights = jnp.ones(mu.shape[:1], mu.dtype)
    w = weights.reshape((-1,) + (1,) * (mu.ndim - 1))
    return jnp.sum(w * precision, 0), jnp.sum(w * precision * mu, 0), jnp.sum(weights)


def poe_from_sums(sum_precision, sum_weighted_mean, count):
    """The normalised geometric mean of Gaussian experts from their sums (Eq. 5).

    ``Sigma = M [sum_m Sigma_m^-1]^-1`` and ``mu = Sigma / M sum_m Sigma_m^-1 mu_m``.

    Returns:
      ``(mu, logvar)`` of the common posterior ``q(z | x, v)``.
    """
    mu = sum_weighted_mean / sum_precision
    logvar = jnp.log(count) - jnp.log(sum_precision)
    return mu, logvar


def product_of_experts(mu, logvar, weights=None):
    """``q(z | x, v) ∝ [prod_m q_m(z)]^(1/M)`` for diagonal Gaussian experts (Eq. 4-5).

    Args:
      mu, logvar: ``(M, ...)`` expert means and log-variances.
      weights: optional ``(M,)`` {0, 1} weights; ``M`` is then their sum.

    Returns:
      ``(mu, logvar)``, each ``(...)``.
    """
    return poe_from_sums(*poe_sums(mu, logvar, weights))


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p):
    """Elementwise ``KL[N(mu_q, var_q) || N(mu_p, var_p)]`` in nats (broadcasting)."""
    return 0.5 * (logvar_p - logvar_q + (jnp.exp(logvar_q) + (mu_q - mu_p) ** 2)
                  * jnp.exp(-logvar_p) - 1.0)


def kl_bound(mu, logvar, weights=None):
    """The upper bound of Eq. 6 on ``KL[q(z|x,v) || p(z|z<l)]`` per voxel.

    ``q`` is the geometric mean of the experts (Eq. 5), the prior their arithmetic mean (Eq. 4);
    by convexity ``KL[q || 1/M sum_m q_m] <= 1/M sum_m KL[q || q_m]``, which is returned.

    Args:
      mu, logvar: ``(M, *spatial, C)`` experts ``q_m``.
      weights: optional ``(M,)`` {0, 1} weights.

    Returns:
      ``(*spatial)``: the bound summed over channels, in nats per voxel.
    """
    if weights is None:
        weights = jnp.ones(mu.shape[:1], mu.dtype)
    mu_c, logvar_c = product_of_experts(mu, logvar, weights)
    kl = jnp.sum(gaussian_kl(mu_c, logvar_c, mu, logvar), axis=-1)
    w = weights.reshape((-1,) + (1,) * (kl.ndim - 1))
    return jnp.sum(w * kl, 0) / jnp.sum(weights)


def _degree(shape) -> np.ndarray:
    """Number of in-grid face neighbours of each voxel, ``shape``."""
    degree = np.zeros(shape)
    for axis, n in enumerate(shape):
        index = np.arange(n).reshape((-1,) + (1,) * (len(shape) - axis - 1))
        degree = degree + 2 - (index == 0) - (index == n - 1)
    return degree


def velocity_kl(mu, logvar, smoothness: float):
    """``KL[q(v) || p(v)]`` (Eq. 3 i) for a diagonal Gaussian ``q`` and the prior of [5].

    The prior is ``p(v) = N(0, Lambda^-1)`` per component with ``Lambda = smoothness * (D - A)``,
    the graph Laplacian of the voxel grid (face neighbours). Up to terms that do not depend on
    ``q``, ``KL = 1/2 [sum_i (smoothness * deg_i * var_i - log var_i)
    + smoothness * sum_{edges (i, j)} (mu_i - mu_j)^2]``, summed over components.

    Args:
      mu, logvar: ``(*spatial, D)`` velocity mean and log-variance in voxels of their grid.
      smoothness: ``lambda`` of the prior.

    Returns:
      Scalar: the KL divided by the number of voxels (nats per voxel).
    """
    d = mu.ndim - 1
    degree = jnp.asarray(_degree(mu.shape[:d]), mu.dtype)[..., None]
    trace = jnp.sum(smoothness * degree * jnp.exp(logvar) - logvar)
    edges = sum(jnp.sum(jnp.diff(mu, axis=a) ** 2) for a in range(d))
    return 0.5 * (trace + smoothness * edges) / np.prod(mu.shape[:d])


def l1_reconstruction(images, reconstructions):
    """Mean absolute error, the negative Laplace log-likelihood of Eq. 2 up to scale and constants.

    Args:
      images, reconstructions: ``(M, *spatial)``.

    Returns:
      Scalar, in image intensity units.
    """
    return jnp.mean(jnp.abs(images - reconstructions))
