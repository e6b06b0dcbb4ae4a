"""xjax: multimodal groupwise image registration by the X-metric, in JAX."""

from xjax.grid import Grid
from xjax.grid import bounding_grid
from xjax.metrics import mutual_information
from xjax.metrics import x_metric
from xjax import presets
from xjax.register import Config
from xjax.register import Result
from xjax.register import Stage
from xjax.register import register
