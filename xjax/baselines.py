"""Baseline groupwise similarities of the X-metric paper (Sec. 4), as :class:`~xjax.objectives.Objective`\\ s.

Each is a frozen dataclass that drives :func:`xjax.register` in place of the X-metric, written for
one group of ``N`` images (``vmap`` over independent groups at the call site). In every one the
warped intensities at the step's sample are ``values`` ``(N, S)`` with voxel weights ``(S,)``; the
similarity is higher for better alignment and differentiable with respect to ``values``:

* :class:`APE`: accumulated pairwise estimates, the sum of the Parzen MI of every pair of images
  (Wachinger & Navab), ``N (N - 1) / 2`` joint histograms;
* :class:`CTE`: conditional template entropy (Polfliet et al.), a principal-component template
  of the warped images at each step's sample;
* :class:`Congealing`: voxel-wise entropy of the group's intensity stack (Learned-Miller;
  Zollei et al.) with a Gaussian Parzen window;
* :class:`GMM`: log-likelihood of the intensity vectors under a mixture of ``K`` full-covariance
  Gaussians fitted by EM every step (Orchard & Mann);
* :class:`VarianceOfIntensities`: the monomodal baseline, minus the variance across the group.

The Parzen range ``[lo, hi]`` of each image, ``(N,)`` each, is the one the registration uses for its
histograms. Congealing, GMM and VarianceOfIntensities compare intensities of different images
directly, so they first map each image onto ``[0, 1]`` by that range (no gradient through it):
``u~ = (u - lo) / (hi - lo)``; their scale parameters are in those units (fractions of the range).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xjax import random as xrandom
from xjax import validate
from xjax.cluster import kmeans_plus_plus, unit_vectors
from xjax.density import entropy, group_pair_histograms
from xjax.objectives import Objective

__all__ = ["APE", "CTE", "Congealing", "GMM", "GMMState", "VarianceOfIntensities"]

#: Floor of weight totals and component masses, against division by zero on empty samples.
_TINY = 1e-12


def _normalised(u, lo, hi):
    """Intensities ``(N, n)`` mapped onto ``[0, 1]`` by the per-image ranges ``lo, hi`` ``(N,)``
    (gradient stopped through the ranges; a zero-width range counts as width one)."""
    lo = jax.lax.stop_gradient(lo)[:, None]
    width = jax.lax.stop_gradient(hi)[:, None] - lo
    return (u - lo) / jnp.where(width > 0, width, 1.0)


def _weighted_mean(f, weights):
    """``sum_x w_x f_x / sum_x w_x`` over the sample (``(S,)`` each)."""
    return jnp.sum(weights * f) / jnp.maximum(jnp.sum(weights), _TINY)


def _check_positive(value, what: str) -> None:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or value <= 0):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")


def _check_count(value, what: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")


def _pair_information(hist):
    """``I(A; B) = H(A) + H(B) - H(A, B)`` in nats from unnormalised ``(..., B_a, B_b)`` histograms."""
    p = hist / jnp.sum(hist, axis=(-2, -1), keepdims=True)
    return entropy(p.sum(-1), axis=-1) + entropy(p.sum(-2), axis=-1) - entropy(p, axis=(-2, -1))


# ---- APE ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class APE(Objective):
    """Accumulated pairwise estimates: ``APE(U) = sum_{i < j} I(U_i; U_j)`` (paper Eq. 3).

    Each ``I(U_i; U_j)`` is the Parzen MI of the sampled intensities of images ``i`` and ``j``
    (cubic B-spline, ``4 x 4`` taps per voxel, the estimator of :func:`xjax.density.pair_histogram`),
    each image binned over its own range with ``L`` bins. The ``N (N - 1) / 2`` pair histograms are
    built by one scatter-add: cost and memory grow as ``O(N^2)``. The sum over pairs is not normalised
    (the authors' code divides it by ``(N - 1) / 2``, a constant factor). No state.
    """

    def similarity(self, state, values, weights, sample_index, lo, hi, bins: int):
        """``sum_{i<j} I(U_i; U_j)`` in nats; ``values`` ``(N, S)``, ``weights`` ``(S,)``."""
        del state, sample_index
        first, second = np.triu_indices(values.shape[0], k=1)
        hist = group_pair_histograms(values[first], values[second], weights, (lo[first], hi[first]),
                                (lo[second], hi[second]), bins)
        return jnp.sum(_pair_information(hist))


# ---- CTE ------------------------------------------------------------------------------------------

@jax.custom_jvp
def _leading_eigenvector(c):
    """The unit eigenvector ``(N,)`` of the largest eigenvalue of a symmetric ``(N, N)`` matrix.

    Its derivative is first-order perturbation theory, ``de = sum_{i: l_i < l_1} v_i v_i^T dC e /
    (l_1 - l_i)``: only the gaps to the largest eigenvalue ``l_1`` enter. (The derivative of
    :func:`jax.numpy.linalg.eigh` divides by every pairwise gap, so two minor eigenvalues that
    coincide, on which ``e`` does not depend, would make it ill-conditioned or not finite.)
    Components along eigenvalues tied with ``l_1``, where ``e`` is not differentiable, are left out.
    """
    return jnp.linalg.eigh(c)[1][:, -1]


@_leading_eigenvector.defjvp
def _leading_eigenvector_jvp(primals, tangents):
    (c,), (dc,) = primals, tangents
    values, vectors = jnp.linalg.eigh(c)
    e = vectors[:, -1]
    gap = values[-1] - values
    inverse = jnp.where(gap > 0, 1.0 / jnp.where(gap > 0, gap, 1.0), 0.0)
    de = vectors @ (inverse * (vectors.T @ (0.5 * (dc + dc.T) @ e)))
    return e, de


def _pca_template(values, weights):
    """The first principal component ``(S,)`` of the z-scored rows of ``values`` ``(N, S)``.

    Each row is z-scored by its weighted mean and standard deviation under the voxel weights
    ``(S,)``; with ``C`` the ``(N, N)`` weighted correlation matrix of the z-scores ``z`` and ``e``
    its leading unit eigenvector, ``T = e^T z``. The sign of ``e`` makes ``T`` correlate positively
    with the mean z-score (their covariance is ``lambda_max sum_i e_i / N``). Differentiable with
    respect to ``values`` wherever the largest eigenvalue of ``C`` is simple.
    """
    w = weights / jnp.maximum(jnp.sum(weights), _TINY)
    centred = values - (values @ w)[:, None]
    std = jnp.sqrt((centred**2) @ w)
    z = centred / jnp.where(std > 0, std, 1.0)[:, None]
    e = _leading_eigenvector((z * w) @ z.T)
    return jnp.where(jnp.sum(e) < 0, -e, e) @ z


@dataclasses.dataclass(frozen=True)
class CTE(Objective):
    """Conditional template entropy: ``CTE(U) = -sum_i H(T | U_i)``.

    The template ``T`` is the first principal component of the warped images at the step's sample,
    each z-scored over the weighted voxels (see :func:`_pca_template`). ``H(T | U_i) = H(T, U_i) -
    H(U_i)`` comes from the Parzen joint histogram of ``(T, U_i)`` (cubic B-spline, ``L`` bins each,
    the template binned over its own range on the sample), as in the authors' code (which minimises
    ``sum_i H(T | U_i)``).

    ``T`` is a function of the warped images and the gradient runs through it (z-scores and
    eigenvector), as automatic differentiation of the authors' loss does. A template held fixed
    within each step ignores that every image is part of it: on the BrainWeb-like experiment
    (``experiments/exp_brainweb.py``, one case) FFD registration then drifts away from alignment,
    gWI 2.1 mm before and 5.3 mm after 100 steps, where this form reaches 1.2 mm. No state.
    """

    def similarity(self, state, values, weights, sample_index, lo, hi, bins: int):
        """``-sum_i H(T | U_i)`` in nats; ``values`` ``(N, S)``, ``weights`` ``(S,)``."""
        del state, sample_index
        n = values.shape[0]
        template = _pca_template(values, weights)
        # Binned over its own range on the sample: mapped onto [0, 1] here, so that the gradient
        # also runs through the range (the histograms stop it).
        inside = weights > 0
        t_lo = jnp.min(jnp.where(inside, template, jnp.inf))
        t_hi = jnp.max(jnp.where(inside, template, -jnp.inf))
        template = (template - t_lo) / jnp.where(t_hi > t_lo, t_hi - t_lo, 1.0)
        unit = (jnp.zeros((n,), values.dtype), jnp.ones((n,), values.dtype))
        p = group_pair_histograms(jnp.broadcast_to(template, values.shape), values, weights, unit,
                                  (lo, hi), bins)
        p = p / jnp.sum(p, axis=(-2, -1), keepdims=True)
        return -jnp.sum(entropy(p, axis=(-2, -1)) - entropy(p.sum(-2), axis=-1))


# ---- congealing -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Congealing(Objective):
    """Congealing: minus the weighted mean over the sampled voxels of the stack entropy ``H_x``.

    With ``u~_ix`` the normalised intensity of image ``i`` at voxel ``x`` (module docstring) and
    ``G_sigma`` the Gaussian density, the leave-one-out Parzen estimate of the entropy of the
    stack ``(u~_1x .. u~_Nx)`` is

        ``H_x = -1/N sum_i log( 1/(N-1) sum_{j != i} G_sigma(u~_ix - u~_jx) )``,

    and the similarity is ``-sum_x w_x H_x / sum_x w_x`` (Eq. 2: the i.i.d. stack model).
    Leave-one-out, because with the ``j = i`` term each density is at least ``G_sigma(0) / N``:
    for the few images of a group that term dominates as soon as the others lie a few ``sigma``
    away, and the gradient that should pull them together vanishes.

    Attributes:
      sigma: Parzen window width in normalised intensity units (a fraction of each image's
        range ``hi - lo``).
    """

    sigma: float = 0.1

    def __post_init__(self):
        _check_positive(self.sigma, "Congealing.sigma")

    def similarity(self, state, values, weights, sample_index, lo, hi, bins: int):
        """``-mean_x H_x`` in nats; ``values`` ``(N, S)`` with ``N >= 2``, ``weights`` ``(S,)``."""
        del state, sample_index, bins
        n = values.shape[0]
        if n < 2:
            raise ValueError(f"congealing needs at least 2 images, got values of shape {values.shape}")
        u = _normalised(values, lo, hi) / self.sigma
        log_kernel = -0.5 * (u[:, None, :] - u[None, :, :]) ** 2  # (N, N, S)
        log_kernel = jnp.where(np.eye(n, dtype=bool)[:, :, None], -jnp.inf, log_kernel)
        log_density = (jax.nn.logsumexp(log_kernel, axis=1) - math.log(n - 1)
                       - math.log(self.sigma * math.sqrt(2.0 * math.pi)))
        return _weighted_mean(jnp.mean(log_density, axis=0), weights)


# ---- GMM ------------------------------------------------------------------------------------------

class GMMState(NamedTuple):
    """A mixture of ``K`` Gaussians over normalised intensity vectors (module docstring).

    Attributes:
      means: ``(K, N)``.
      covariances: ``(K, N, N)``, every eigenvalue at least the floor.
      pi: ``(K,)`` mixing proportions.
    """

    means: jax.Array
    covariances: jax.Array
    pi: jax.Array


def _component_log_densities(state: GMMState, x):
    """``log pi_k + log N(x_v; mu_k, Sigma_k)`` for vectors ``x`` ``(n, N)``: ``(n, K)``.

    The ``N x N`` inverse Cholesky factors are formed once per component, so the ``n`` vectors are
    whitened by one small matrix product (a batched triangular solve is far slower on CPU)."""
    dim = x.shape[-1]
    chol = jnp.linalg.cholesky(state.covariances)
    eye = jnp.broadcast_to(jnp.eye(dim, dtype=chol.dtype), chol.shape)
    inverse = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)  # (K, N, N)
    white = jnp.einsum("kmn,vkn->vkm", inverse, x[:, None, :] - state.means[None])
    log_det = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    log_normal = -0.5 * (jnp.sum(white**2, axis=-1) + log_det + dim * math.log(2.0 * math.pi))
    return log_normal + jnp.log(jnp.maximum(state.pi, _TINY))


def _floor_eigenvalues(cov, floor: float):
    """Symmetric ``(..., N, N)`` matrices with their eigenvalues raised to at least ``floor``:
    the maximiser of the Gaussian likelihood over covariances ``>= floor I``, so EM stays monotone."""
    values, vectors = jnp.linalg.eigh(cov)
    return (vectors * jnp.maximum(values, floor)[..., None, :]) @ jnp.swapaxes(vectors, -1, -2)


def _em_step(state: GMMState, x, weights, floor: float) -> GMMState:
    """One EM iteration over vectors ``x`` ``(V, N)`` with voxel weights ``(V,)``: responsibilities,
    then weighted means, covariances (eigenvalues floored) and proportions. A component without
    mass keeps its mean and covariance."""
    r = jax.nn.softmax(_component_log_densities(state, x), axis=-1) * weights[:, None]  # (V, K)
    mass = jnp.sum(r, axis=0)
    safe = jnp.maximum(mass, _TINY)
    means = (r.T @ x) / safe[:, None]
    diff = x[:, None, :] - means[None]  # (V, K, N)
    cov = jnp.einsum("vk,vkn,vkm->knm", r, diff, diff) / safe[:, None, None]
    cov = _floor_eigenvalues(0.5 * (cov + jnp.swapaxes(cov, -1, -2)), floor)
    alive = mass > _TINY
    return GMMState(jnp.where(alive[:, None], means, state.means),
                    jnp.where(alive[:, None, None], cov, state.covariances),
                    mass / jnp.maximum(jnp.sum(mass), _TINY))


def _em(state: GMMState, x, weights, floor: float, iterations: int) -> GMMState:
    return jax.lax.fori_loop(0, iterations, lambda _, s: _em_step(s, x, weights, floor), state)


@dataclasses.dataclass(frozen=True)
class GMM(Objective):
    """Gaussian mixture of the joint intensity distribution (Orchard & Mann).

    The normalised intensity vector of a voxel ``x~ = (u~_1 .. u~_N)`` (module docstring) follows
    ``p(x~) = sum_k pi_k N(x~; mu_k, Sigma_k)`` with full ``N x N`` covariances. The similarity is
    the weighted mean log-likelihood over the sample, ``sum_x w_x log p(x~_x) / sum_x w_x``.

    The mixture is fitted by EM over the whole level grid in :meth:`update` (``iterations`` per
    step, warm-started from the state). The original starts every mean at the global mean, a fixed
    point of EM where the components never separate; here :meth:`init` draws the means by a
    key-driven greedy k-means++ pick (:func:`xjax.cluster.kmeans_plus_plus`), starts every
    covariance at the global one and runs ``init_iterations`` of EM. Every covariance eigenvalue
    is kept at least ``floor``, a constrained M-step that keeps EM's log-likelihood non-decreasing.

    Attributes:
      num_classes: ``K``, the mixture's components (the classes of the common anatomy).
      iterations: EM iterations per registration step.
      init_iterations: EM iterations after the k-means++ pick in :meth:`init`.
      floor: least covariance eigenvalue, in squared normalised units ((fraction of range)^2).
    """

    num_classes: int = 4
    iterations: int = 1
    init_iterations: int = 20
    floor: float = 1e-4

    def __post_init__(self):
        validate.check_num_classes(self.num_classes)
        _check_count(self.iterations, "GMM.iterations", 1)
        _check_count(self.init_iterations, "GMM.init_iterations", 0)
        _check_positive(self.floor, "GMM.floor")

    def init(self, key, images, weights) -> GMMState:
        """k-means++ means, the global covariance, uniform ``pi``, then ``init_iterations`` of EM over
        the unwarped images ``(N, V)`` (each normalised by its own min/max)."""
        x = unit_vectors(images)
        w = weights / jnp.maximum(jnp.sum(weights), _TINY)
        means = kmeans_plus_plus(xrandom.seed(key), x, w, self.num_classes)
        centred = x - w @ x
        cov = _floor_eigenvalues((centred * w[:, None]).T @ centred, self.floor)
        k = self.num_classes
        state = GMMState(means, jnp.broadcast_to(cov, (k,) + cov.shape),
                         jnp.full((k,), 1.0 / k, x.dtype))
        return _em(state, x, weights, self.floor, self.init_iterations)

    def update(self, state: GMMState, warped, weights, lo, hi, bins: int, sample_index) -> GMMState:
        """``iterations`` of EM over the warped images ``(N, V)`` under the weights ``(V,)``."""
        del bins, sample_index
        x = jax.lax.stop_gradient(_normalised(warped, lo, hi).T)
        return _em(state, x, jax.lax.stop_gradient(weights), self.floor, self.iterations)

    def similarity(self, state: GMMState, values, weights, sample_index, lo, hi, bins: int):
        """Weighted mean ``log p(x~)`` (nats) of the sampled vectors; ``values`` ``(N, S)``."""
        del sample_index, bins
        log_joint = _component_log_densities(jax.lax.stop_gradient(state), _normalised(values, lo, hi).T)
        return _weighted_mean(jax.nn.logsumexp(log_joint, axis=-1), weights)


# ---- variance of intensities -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VarianceOfIntensities(Objective):
    """Variance of intensities (monomodal): ``-sum_x w_x Var_i(u~_ix) / sum_x w_x``.

    ``Var_i`` is the population variance across the group (divided by ``N``) of the normalised
    intensities ``u~`` (module docstring), so the value does not depend on the images' units and
    images of one modality with different gains still compare. No state.
    """

    def similarity(self, state, values, weights, sample_index, lo, hi, bins: int):
        """Minus the weighted mean variance; ``values`` ``(N, S)``, ``weights`` ``(S,)``."""
        del state, sample_index, bins
        return -_weighted_mean(jnp.var(_normalised(values, lo, hi), axis=0), weights)
