"""Neural networks of xjax in Flax NNX: building blocks (:mod:`xjax.nn.blocks`), checkpoints
(:mod:`xjax.nn.checkpoint`), deep combined computing (:mod:`xjax.nn.dcc`, ``dcc_losses``,
``dcc_train``, ``dcc_cli``) and BInGo. Import the submodules explicitly
(``from xjax.nn import blocks``)."""
