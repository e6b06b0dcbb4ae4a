"""xjax: multimodal groupwise image registration by the X-metric (X-CoReg), in JAX.

The coordinate convention is written once, in :mod:`xjax.grid`.

The public names below are imported on first use (PEP 562), so that ``import xjax`` alone, and
with it the command line's ``--help`` and its input errors, costs no JAX import.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it
_NAMES = {
    "Config": "xjax.config",
    "Result": "xjax.config",
    "Stage": "xjax.config",
    "EMState": "xjax.em",
    "Grid": "xjax.grid",
    "bounding_grid": "xjax.grid",
    "mutual_information": "xjax.metrics",
    "x_metric": "xjax.metrics",
    "APE": "xjax.objectives",
    "CTE": "xjax.objectives",
    "GMM": "xjax.objectives",
    "Congealing": "xjax.objectives",
    "Objective": "xjax.objectives",
    "VarianceOfIntensities": "xjax.objectives",
    "XMetric": "xjax.objectives",
    "register": "xjax.registration",
}
_SUBMODULES = ("evaluate", "objectives", "phantoms", "presets", "transforms")

__all__ = sorted(_NAMES) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"xjax.{name}")
    else:
        raise AttributeError(f"module 'xjax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
