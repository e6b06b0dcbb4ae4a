"""BInGo (groupwise registration by hierarchical disentanglement): the model, its ELBO and training.

* :mod:`xjax.nn.bingo.model`: the networks, :func:`forward` (one group, one pass) and
  :func:`register_group` (any group size, in chunks), re-exported here;
* :mod:`xjax.nn.bingo.losses`: the terms of the evidence lower bound (Eq. 2-6);
* :mod:`xjax.nn.bingo.train`: partial and complete learning, checkpoints and weight files.

``from xjax.nn import bingo`` gives the model's names; import ``losses`` and ``train`` explicitly
(``from xjax.nn.bingo import losses, train``). Images are normalised to [0, 1] by
:func:`xjax.intensity.unit_range`; displacements are in world mm and warp through :mod:`xjax.warp`.
"""

from xjax.nn.bingo.model import BInGo
from xjax.nn.bingo.model import BingoConfig
from xjax.nn.bingo.model import Outputs
from xjax.nn.bingo.model import Registration
from xjax.nn.bingo.model import check_group
from xjax.nn.bingo.model import create
from xjax.nn.bingo.model import forward
from xjax.nn.bingo.model import integrate
from xjax.nn.bingo.model import level_grids
from xjax.nn.bingo.model import loss_terms
from xjax.nn.bingo.model import register_group

__all__ = ["BInGo", "BingoConfig", "Outputs", "Registration", "check_group", "create", "forward", "integrate",
           "level_grids", "loss_terms", "register_group"]
