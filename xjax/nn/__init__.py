"""Neural networks of xjax in Flax NNX.

* :mod:`xjax.nn.blocks`: convolutional building blocks and host-side initialisation;
* :mod:`xjax.nn.checkpoint`: checkpoints and weight files (a pytree and a JSON config in one
  ``.npz``);
* :mod:`xjax.nn.training`: what the two training loops share (fast-compile options, schedule);
* :mod:`xjax.nn.dcc`: deep combined computing (``model``, ``losses``, ``train``);
* :mod:`xjax.nn.bingo`: BInGo, the hierarchical VAE (``model``, ``losses``, ``train``);
* ``weights/``: trained weights shipped with the package.

Both networks warp through :mod:`xjax.warp` and normalise through :mod:`xjax.intensity`; their
command lines live in :mod:`xjax.cli`. Import the submodules explicitly (``from xjax.nn import
dcc``, ``from xjax.nn.dcc import train``).
"""
