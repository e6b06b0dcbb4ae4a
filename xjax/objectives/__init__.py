"""Groupwise similarities that drive :func:`xjax.register`: the X-metric and the paper's baselines.

Each is an :class:`Objective` (the protocol, :mod:`xjax.objectives.base`): a frozen, hashable spec
with pure ``init`` / ``update`` / ``similarity`` functions over a state pytree, written for one group
of ``N`` images (``vmap`` over independent groups at the call site). In every one the warped
intensities at the step's sample are ``values`` ``(N, S)`` with voxel weights ``(S,)``; the
similarity is higher for better alignment and differentiable with respect to ``values``:

* :class:`XMetric`: the X-metric ``sum_j I(U_j o phi_j; Z)`` with the E-step of Algorithm 1
  (:mod:`~xjax.objectives.xmetric`);

and the baselines of the X-metric paper (Sec. 4):

* :class:`APE`: accumulated pairwise estimates, the sum of the Parzen MI of every pair of images
  (Wachinger & Navab), ``N (N - 1) / 2`` joint histograms (:mod:`~xjax.objectives.ape`);
* :class:`CTE`: conditional template entropy (Polfliet et al.), a principal-component template
  of the warped images at each step's sample (:mod:`~xjax.objectives.cte`);
* :class:`Congealing`: voxel-wise entropy of the group's intensity stack (Learned-Miller;
  Zollei et al.) with a Gaussian Parzen window (:mod:`~xjax.objectives.congealing`);
* :class:`GMM`: log-likelihood of the intensity vectors under a mixture of ``K`` full-covariance
  Gaussians fitted by EM every step (Orchard & Mann) (:mod:`~xjax.objectives.gmm`);
* :class:`VarianceOfIntensities`: the monomodal baseline, minus the variance across the group
  (:mod:`~xjax.objectives.variance`).

The Parzen range ``[lo, hi]`` of each image, ``(N,)`` each, is the one the registration uses for its
histograms. Congealing, GMM and VarianceOfIntensities compare intensities of different images
directly, so they first map each image onto ``[0, 1]`` by that range (no gradient through it):
``u~ = (u - lo) / (hi - lo)``; their scale parameters are in those units (fractions of the range).
"""

from xjax.objectives.ape import APE as APE
from xjax.objectives.base import INITS as INITS
from xjax.objectives.base import Objective as Objective
from xjax.objectives.congealing import Congealing as Congealing
from xjax.objectives.cte import CTE as CTE
from xjax.objectives.gmm import GMM as GMM
from xjax.objectives.gmm import GMMState as GMMState
from xjax.objectives.variance import VarianceOfIntensities as VarianceOfIntensities
from xjax.objectives.xmetric import XMetric as XMetric
from xjax.objectives.xmetric import XState as XState

__all__ = ["Objective", "INITS", "XMetric", "XState", "APE", "CTE", "Congealing", "GMM", "GMMState",
           "VarianceOfIntensities"]
