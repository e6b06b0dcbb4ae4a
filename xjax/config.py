"""The specs and the result of a registration: :class:`Stage`, :class:`Config`, :class:`Result`.

Frozen, hashable dataclasses of Python scalars (static under ``jit``: a ``Config`` is part of the
compiled program's key) and the :class:`Result` pytree that :func:`xjax.register` returns, with the
meaning of its status codes (:data:`STATUS`). The named presets of :mod:`xjax.presets` build these
specs; :mod:`xjax.registration` runs them.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import optax

from xjax import validate
from xjax.metrics import FORMS
from xjax.objectives import INITS, Objective, XMetric
from xjax.transforms import Transform

__all__ = ["Stage", "Config", "Result", "Quality", "STATUS", "Mode"]

#: How the group's transforms are anchored (see :attr:`Config.mode`).
Mode = Literal["unbiased", "reference"]
#: ``Result.status`` codes.
STATUS = {0: "converged", 1: "non-finite loss or parameters",
          2: "the overlap region (Eq. 14) ran empty: an image left the others' field of view",
          3: "folded: the transform of some image is not invertible (Jacobian determinant <= 0 "
             "somewhere in the common space)"}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a registration: a transform model optimised over a pyramid.

    Attributes:
      transform: the transform spec (unbound; :func:`xjax.register` binds it to the common grid).
      iterations: optimisation steps per pyramid level.
      levels: pyramid levels, run coarse to fine; level ``l`` halves the grid ``l`` times.
      learning_rate: Adam's initial step size (ignored when ``optimizer`` is given); it decays
        along a cosine to 5% over each level. Updates are then scaled per parameter by
        ``transform.lr_scale()`` (e.g. 0.01 for angles in radians).
      bins: ``L``, Parzen intensity bins.
      sample_rate: fraction of the level's voxels drawn at random each step for the metric.
      bending: ``lambda``, weight of the bending energy (summed over the group; Eq. 15).
      jitter: the metric's samples are read at their voxel centre plus a random offset of up to
        ``jitter`` voxels per axis, redrawn every step, the same for every image (0: no offset).
        Without it, linear interpolation smooths an image most at half-voxel shifts, which lowers
        its noise and raises the X-metric there: a bias of up to half a voxel away from alignment.
      optimizer: any ``optax.GradientTransformation`` (default: Adam with the cosine decay above);
        it is initialised afresh at every pyramid level.
    """

    transform: Transform
    iterations: int = 100
    levels: int = 1
    learning_rate: float = 0.1
    bins: int = 64
    sample_rate: float = 0.1
    bending: float = 0.0
    jitter: float = 0.5
    optimizer: optax.GradientTransformation | None = None

    def __post_init__(self):
        if not isinstance(self.transform, Transform):
            raise ValueError(f"Stage.transform must be an xjax transform, got {self.transform!r}")
        for name in ("iterations", "levels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Stage.{name} must be >= 1, got {getattr(self, name)}")
        validate.check_bins(self.bins)
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"Stage.sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.bending < 0:
            raise ValueError(f"Stage.bending must be >= 0, got {self.bending}")
        if not 0.0 <= self.jitter <= 0.5:
            raise ValueError(f"Stage.jitter must be in [0, 0.5] voxels, got {self.jitter}")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["transform"] = repr(self.transform)
        d["optimizer"] = "adam" if self.optimizer is None else repr(self.optimizer)
        return d


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole registration: stages in optimisation order plus the common-anatomy model.

    Attributes:
      stages: the stages; their transforms compose as ``phi = T_1 o ... o T_m`` (the last stage
        acts first on the common-space point, see :mod:`xjax.transforms.chain`).
      num_classes: ``K``, classes of the common anatomy.
      mode: ``"unbiased"`` (Eq. 37: the group mean of the transforms is the identity) or
        ``"reference"`` (image ``reference`` stays at the identity: group-to-reference).
      reference: the fixed image in ``"reference"`` mode.
      form: the X-metric form, ``"mi"`` (Eq. 17) or ``"reference"`` (``-H(K | U_j)``); both give the
        same gradient for a fixed posterior.
      init_posterior: the X-metric's posterior before the first step, ``"kmeans"`` or ``"random"``
        (Eq. 22); see :class:`xjax.objectives.XMetric`.
      objective: the groupwise similarity (:class:`xjax.objectives.Objective`); default ``None``,
        the X-metric ``XMetric(num_classes, form, init_posterior)``. Any other objective (e.g. a
        baseline of :mod:`xjax.objectives`) drives the same optimisation; the result then has no
        posterior.
      intensity_range: the percentiles ``(low, high)`` of each image's intensities (over its whole
        grid, at each pyramid level) that span its Parzen window; intensities beyond them are
        clipped to them. The default (0.5, 99.5) keeps a few extreme voxels (a hot pixel, an
        artefact) from squeezing every other intensity into a few bins; ``(0, 100)`` is the
        image's min / max, as in the paper and the authors' code.
    """

    stages: tuple[Stage, ...]
    num_classes: int = 4
    mode: Mode = "unbiased"
    reference: int = 0
    form: Literal["mi", "reference"] = "mi"
    init_posterior: Literal["kmeans", "random"] = "kmeans"
    objective: Objective | None = None
    intensity_range: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise ValueError("Config needs at least one stage")
        validate.check_num_classes(self.num_classes)
        if self.mode not in ("unbiased", "reference"):
            raise ValueError(f"mode must be 'unbiased' or 'reference', got {self.mode!r}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        if self.init_posterior not in INITS:
            raise ValueError(f"init_posterior must be one of {INITS}, got {self.init_posterior!r}")
        low, high = (float(q) for q in self.intensity_range)
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"intensity_range must be percentiles 0 <= low < high <= 100, got "
                             f"{self.intensity_range!r}")
        object.__setattr__(self, "intensity_range", (low, high))
        if self.objective is not None and not isinstance(self.objective, Objective):
            raise ValueError(f"Config.objective must be an xjax Objective, got {self.objective!r}")

    @property
    def metric(self) -> Objective:
        """The objective in use: ``objective``, or the X-metric with ``num_classes``, ``form`` and
        ``init_posterior``."""
        if self.objective is None:
            return XMetric(self.num_classes, self.form, self.init_posterior)
        return self.objective

    @property
    def total_steps(self) -> int:
        return sum(s.iterations * s.levels for s in self.stages)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["stages"] = [s.to_dict() for s in self.stages]
        d["objective"] = repr(self.metric)
        return d


class Quality(NamedTuple):
    """How each image's final transform behaves, so that a bad registration says so. Every field
    is ``(N,)``, one value per image, taken over the voxels of the common grid where the mask is
    positive (every voxel without a mask).

    Attributes:
      jacobian_min: the least determinant of the Jacobian of ``x -> x + u_j(x)``
        (:func:`xjax.regularizers.jacobian_determinant`); ``<= 0`` where the transform folds.
      folded_fraction: the fraction of voxels where that determinant is ``<= 0``.
      movement_mean: the mean length of ``u_j`` in mm: how far image ``j`` was moved (in unbiased
        mode, relative to the group's average space).
      movement_p99: the 99th percentile of that length in mm.
    """

    jacobian_min: jax.Array
    folded_fraction: jax.Array
    movement_mean: jax.Array
    movement_p99: jax.Array


class Result(NamedTuple):
    """What :func:`xjax.register` returns (every field an array or pytree of arrays, so it vmaps).

    Attributes:
      params: one entry per stage: the group's parameters of that stage (leading axis ``N``),
        as applied (centred in unbiased mode).
      displacements: ``(N, *spatial, D)`` in mm on the common grid: ``phi_j(x) = x + u_j(x)``.
      warped: ``(N, *spatial)`` images pulled through ``phi_j``.
      posterior: ``(*spatial, K)`` posterior of the common anatomy at the final transforms (X-metric
        only; ``None`` for other objectives).
      pi: ``(K,)`` class proportions (X-metric only; ``None`` for other objectives).
      loss_history: ``(T,)`` loss (``-X + lambda R``) of every step, stages and levels in order.
      status: int scalar (see :data:`STATUS`): 0 when every loss and parameter is finite and no
        transform folds; 1 for non-finite losses or parameters; 2 when some step's sample held no
        voxel inside every warped image (the group had drifted apart); 3 when the final transform
        of some image folds (see ``quality``).
      quality: :class:`Quality`, per image: Jacobian determinant minimum, folded fraction and
        movement.
    """

    params: tuple
    displacements: jax.Array
    warped: jax.Array
    posterior: jax.Array
    pi: jax.Array
    loss_history: jax.Array
    status: jax.Array
    quality: Quality
