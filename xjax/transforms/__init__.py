"""Spatial transforms of xjax: pull maps ``phi(x) = x + u(x)`` in world mm (see :mod:`xjax.grid`).

Each transform is a frozen, hashable spec bound to the common grid with ``bind``; its parameters
for one image are a dict of arrays (see :class:`~xjax.transforms.base.Transform`).
"""

from xjax.transforms.base import Params as Params
from xjax.transforms.base import Transform as Transform
from xjax.transforms.base import subtract_group_mean as subtract_group_mean
from xjax.transforms.bspline import BSplineFFD as BSplineFFD
from xjax.transforms.bspline import ffd_levels as ffd_levels
from xjax.transforms.chain import chain_displacement as chain_displacement
from xjax.transforms.chain import compose_points as compose_points
from xjax.transforms.dense import DenseDisplacement as DenseDisplacement
from xjax.transforms.dense import StationaryVelocity as StationaryVelocity
from xjax.transforms.dense import resample_field as resample_field
from xjax.transforms.dense import scaling_and_squaring as scaling_and_squaring
from xjax.transforms.linear import Affine as Affine
from xjax.transforms.linear import Rigid as Rigid
from xjax.transforms.linear import Translation as Translation
from xjax.transforms.linear import rotation_matrix as rotation_matrix
