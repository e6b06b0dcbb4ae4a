"""xjax: multimodal groupwise image registration by the X-metric, in JAX."""

from xjax.grid import Grid
from xjax.grid import bounding_grid
from xjax.metrics import mutual_information
from xjax.metrics import x_metric
