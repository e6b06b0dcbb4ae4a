"""xjax: multimodal groupwise image registration by the X-metric (X-CoReg), in JAX.

The coordinate convention is written once, in :mod:`xjax.grid`.
"""

__version__ = "0.1.0"

from xjax import evaluate
from xjax import objectives
from xjax import phantoms
from xjax import presets
from xjax import transforms
from xjax.config import Config
from xjax.config import Result
from xjax.config import Stage
from xjax.em import EMState
from xjax.grid import Grid
from xjax.grid import bounding_grid
from xjax.metrics import mutual_information
from xjax.metrics import x_metric
from xjax.objectives import APE
from xjax.objectives import CTE
from xjax.objectives import GMM
from xjax.objectives import Congealing
from xjax.objectives import Objective
from xjax.objectives import VarianceOfIntensities
from xjax.objectives import XMetric
from xjax.registration import register
