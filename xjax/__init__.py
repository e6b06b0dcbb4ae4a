"""xjax: multimodal groupwise image registration by the X-metric (X-CoReg), in JAX.

The coordinate convention is written once, in :mod:`xjax.grid`.
"""

__version__ = "0.1.0"

from xjax import baselines
from xjax import evaluate
from xjax import phantoms
from xjax import presets
from xjax import transforms
from xjax.em import EMState
from xjax.grid import Grid
from xjax.grid import bounding_grid
from xjax.metrics import mutual_information
from xjax.metrics import x_metric
from xjax.baselines import APE
from xjax.baselines import CTE
from xjax.baselines import GMM
from xjax.baselines import Congealing
from xjax.baselines import VarianceOfIntensities
from xjax.objectives import Objective
from xjax.objectives import XMetric
from xjax.registration import Config
from xjax.registration import Result
from xjax.registration import Stage
from xjax.registration import register
