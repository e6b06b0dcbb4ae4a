"""Deep combined computing (DCC, X-metric paper Sec. 3.5): the network, its losses and training.

* :mod:`xjax.nn.dcc.model`: the network, :class:`DCCConfig`, :func:`create` and the units of its
  outputs (voxel displacements on :func:`unit_grid`, :func:`displacement_to_mm`), re-exported here;
* :mod:`xjax.nn.dcc.losses`: the losses of Eq. (38)-(47) for one group;
* :mod:`xjax.nn.dcc.train`: the dataset, the jitted train step, :func:`~xjax.nn.dcc.train.train`,
  inference and weight files.

``from xjax.nn import dcc`` gives the model's names; import ``losses`` and ``train`` explicitly
(``from xjax.nn.dcc import losses, train``). ``normalise`` is :func:`xjax.intensity.zscore`, the
normalisation DCC expects.
"""

from xjax.intensity import zscore as normalise
from xjax.nn.dcc.model import REGISTRATION_BRANCH
from xjax.nn.dcc.model import DCC
from xjax.nn.dcc.model import DCCConfig
from xjax.nn.dcc.model import DCCOutput
from xjax.nn.dcc.model import create
from xjax.nn.dcc.model import displacement_to_mm
from xjax.nn.dcc.model import unit_grid

__all__ = ["DCC", "DCCConfig", "DCCOutput", "REGISTRATION_BRANCH", "create", "displacement_to_mm", "normalise",
           "unit_grid"]
