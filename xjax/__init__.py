"""xjax: multimodal groupwise image registration by the X-metric, in JAX."""
from xjax.grid import Grid, bounding_grid
