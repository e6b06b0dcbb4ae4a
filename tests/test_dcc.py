"""Deep combined computing: network shapes and invariants, losses against numpy float64 references,
where gradients go, training (loss decreases, exact resume, one compilation) and inference."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import xjax.warp
from xjax import phantoms
from xjax.intensity import zscore
from xjax.nn import dcc
from xjax.nn.dcc import losses as dcc_losses
from xjax.nn.dcc import train as dcc_train
from xjax.nn.training import FAST_COMPILE

TINY = {2: dcc.DCCConfig(ndim=2, num_classes=3, num_modalities=3, width=2, levels=2, flow_scales=2),
        3: dcc.DCCConfig(ndim=3, num_classes=3, num_modalities=3, width=2, levels=2, flow_scales=2)}
SPATIAL = {2: (16, 12), 3: (8, 8, 6)}
#: One level and the bottleneck: the fewest operations to compile, for the gradient and training tests.
SHALLOW = dcc.DCCConfig(ndim=2, num_classes=3, num_modalities=3, width=2, levels=1, flow_scales=1)


def _with_random_flow_heads(model, seed):
    """Non-zero flow heads, so that displacements are not trivially zero."""
    rng = np.random.default_rng(seed)
    for head in model.flow_heads:
        head.kernel[...] = jnp.asarray(rng.normal(0, 0.3, head.kernel.shape), jnp.float32)
    return model


@functools.lru_cache(maxsize=None)
def _forward(ndim):
    """A jitted forward over split state, shared by the tests (compiled once per group size)."""
    graphdef = nnx.split(dcc.create(TINY[ndim]))[0]
    return graphdef, jax.jit(lambda state, x, m: nnx.merge(graphdef, state)(x, m), compiler_options=FAST_COMPILE)


@pytest.mark.parametrize("ndim", [2, 3])
def test_shapes_dtypes_zero_mean_and_equivariance(ndim):
    model = _with_random_flow_heads(dcc.create(TINY[ndim], seed=ndim), ndim)
    _, forward = _forward(ndim)
    state = nnx.state(model)
    rng = np.random.default_rng(0)
    for n in (2, 3, 4, 5):
        x = jnp.asarray(rng.normal(size=(n,) + SPATIAL[ndim]), jnp.float32)
        modality = jnp.asarray(rng.integers(0, 3, n), jnp.int32)
        out = forward(state, x, modality)
        chex.assert_shape(out.probs, (n,) + SPATIAL[ndim] + (3,))
        chex.assert_shape(out.displacement, (n,) + SPATIAL[ndim] + (ndim,))
        chex.assert_type([out.probs, out.displacement], jnp.float32)
        np.testing.assert_allclose(np.asarray(out.probs).sum(-1), 1.0, atol=1e-5)
        disp = np.asarray(out.displacement, np.float64)
        assert np.abs(disp).max() > 1e-2  # the heads are live
        np.testing.assert_allclose(disp.mean(axis=0), 0.0, atol=1e-5 * np.abs(disp).max())
        if n == 4:  # permuting the group permutes the outputs (moment fusion is symmetric)
            perm = np.array([2, 0, 3, 1])
            permuted = forward(state, x[perm], modality[perm])
            np.testing.assert_allclose(np.asarray(permuted.probs), np.asarray(out.probs)[perm], atol=1e-5)
            np.testing.assert_allclose(np.asarray(permuted.displacement), disp[perm], atol=1e-4)


def test_fresh_model_starts_at_the_identity():
    model = dcc.create(TINY[2])
    out = _forward(2)[1](nnx.state(model), jnp.ones((3,) + SPATIAL[2]), jnp.arange(3))
    assert np.array_equal(np.asarray(out.displacement), np.zeros_like(out.displacement))


def test_config_validation():
    with pytest.raises(ValueError, match="ndim"):
        dcc.DCCConfig(ndim=4)
    with pytest.raises(ValueError, match="num_classes"):
        dcc.DCCConfig(num_classes=1)
    with pytest.raises(ValueError, match="width"):
        dcc.DCCConfig(width=0)
    with pytest.raises(ValueError, match="zeta"):
        dcc_losses.LossConfig(num_classes=4, zeta=0.3)
    with pytest.raises(ValueError, match="strategy"):
        dcc_train.TrainConfig(strategy="DCC")


# ---- losses against numpy float64 -------------------------------------------------------------

def _beta3(t):
    a = np.abs(t)
    return np.where(a < 1, (4 - 6 * a ** 2 + 3 * a ** 3) / 6, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))


def _positions(u, bins):
    lo, hi = u.min(), u.max()
    return (u - lo) / ((hi - lo) / bins) + 2


def _hist(u, weights, bins):
    """Brute force: every sample against every bin centre, ``(L + 4, K)``."""
    return (_beta3(_positions(u, bins)[:, None] - np.arange(bins + 4))[:, :, None] * weights[:, None, :]).sum(0)


def _table(u, weights, bins):
    h = _hist(u, weights, bins)
    return h / h.sum(0)


def _log_lik(table, u, bins):
    pos = np.clip(_positions(u, bins), 0, bins + 3)
    below = np.clip(np.floor(pos), 0, bins + 2).astype(int)
    frac = (pos - below)[:, None]
    lt = np.log(np.maximum(table, 1e-8))
    return (1 - frac) * lt[below] + frac * lt[below + 1]


def _softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _posterior_ref(images, own, label_probs, labelled, prior, bins):
    """Eq. (39)-(40) with identity transforms, two E-steps, in float64."""
    n, _, k = own.shape
    log_prior = np.log(prior) + sum(np.log(label_probs[j]) for j in range(n) if labelled[j])
    q = _softmax(np.log(1.0 / k) + log_prior + sum(_log_lik(_table(images[j], own[j], bins), images[j], bins)
                                                   for j in range(n)))
    pi = q.mean(0)
    q = _softmax(np.log(pi) + log_prior + sum(_log_lik(_table(images[j], q, bins), images[j], bins)
                                              for j in range(n)))
    return q, q.mean(0)


def _entropy(p):
    return -np.sum(p * np.log(np.maximum(p, 1e-8)))


def _mi(hist):
    p = hist / hist.sum()
    return _entropy(p.sum(1)) + _entropy(p.sum(0)) - _entropy(p)


@pytest.fixture
def small_group():
    rng = np.random.default_rng(3)
    n, k, spatial = 3, 3, (9, 8)
    labels = rng.integers(0, k, (n,) + spatial)
    images = rng.normal(size=(n,) + spatial) + labels
    probs = _softmax(rng.normal(size=(n,) + spatial + (k,)))
    label_probs = _softmax(2 * rng.normal(size=(n,) + spatial + (k,)))
    prior = _softmax(rng.normal(size=spatial + (k,)))
    return images, labels, probs, label_probs, prior


def test_losses_match_numpy_at_identity(x64, small_group):
    images, labels, probs, label_probs, prior = small_group
    n, k, bins, zeta = 3, 3, 8, 0.05
    labelled = np.array([True, False, False])
    group = dcc_losses.Group(jnp.asarray(images), jnp.arange(n), jnp.asarray(labels), jnp.asarray(label_probs),
                             jnp.asarray(labelled), jnp.asarray(prior))
    config = dcc_losses.LossConfig(num_classes=k, bins=bins, zeta=zeta, bending_weight=3.0)
    losses = jax.jit(dcc_losses.dcc_losses, static_argnums=3, compiler_options=FAST_COMPILE)
    got = losses(jnp.asarray(probs), jnp.zeros((n, 9, 8, 2)), group, config)

    clip = lambda p: np.clip(p, zeta, 1 - (k - 1) * zeta)
    flat = lambda a: a.reshape(n, 72, -1)
    x = images.reshape(n, 72)
    own = np.where(labelled[:, None, None], flat(clip(label_probs)), flat(clip(probs)))
    gamma, _ = _posterior_ref(x, own, flat(clip(label_probs)), labelled, clip(prior).reshape(72, k), bins)
    x_metric = sum(_mi(_hist(x[j], gamma, bins)) for j in range(n))
    hybrid = sum(-np.sum(gamma * np.log(own[j])) / 72 for j in range(n))
    p = flat(probs)
    onehot = np.eye(k)[labels.reshape(n, 72)]
    info = sum(_mi(_hist(x[j], p[j], bins)) for j in range(n))
    entropy = [-np.mean(np.sum(p[j] * np.log(p[j]), -1)) for j in range(n)]
    ce = -np.mean(np.sum(onehot[0] * np.log(p[0]), -1))
    dice = np.mean(2 * (onehot[0] * p[0]).sum(0) / (onehot[0].sum(0) + p[0].sum(0)))
    segmentation = -info + entropy[1] + entropy[2] + ce + 1 - dice
    np.testing.assert_allclose(float(got.x_metric), x_metric, rtol=1e-9)
    np.testing.assert_allclose(float(got.bending), 0.0, atol=1e-12)
    np.testing.assert_allclose(float(got.registration), -x_metric, rtol=1e-9)
    np.testing.assert_allclose(float(got.hybrid), hybrid, rtol=1e-9)
    np.testing.assert_allclose(float(got.segmentation), segmentation, rtol=1e-9)
    np.testing.assert_allclose(float(got.total), -x_metric + hybrid + segmentation, rtol=1e-9)


def test_posterior_matches_numpy(x64, small_group):
    images, _, probs, label_probs, prior = small_group
    n, k, bins = 3, 3, 8
    labelled = np.array([False, True, True])
    x = images.reshape(n, 72)
    own = np.where(labelled[:, None, None], label_probs.reshape(n, 72, k), probs.reshape(n, 72, k))
    posterior = jax.jit(dcc_losses.posterior, static_argnums=7, compiler_options=FAST_COMPILE)
    got = posterior(jnp.asarray(x), jnp.asarray(x), jnp.ones(72), jnp.asarray(own),
                    jnp.asarray(label_probs.reshape(n, 72, k)), jnp.asarray(labelled),
                    jnp.asarray(prior.reshape(72, k)), bins)
    q, pi = _posterior_ref(x, own, label_probs.reshape(n, 72, k), labelled, prior.reshape(72, k), bins)
    np.testing.assert_allclose(np.asarray(got.posterior), q, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(got.pi), pi, rtol=1e-9)


def test_signed_distance_against_brute_force():
    rng = np.random.default_rng(5)
    mask = np.zeros((14, 13), bool)
    mask[3:10, 4:11] = True
    mask[rng.integers(0, 14, 6), rng.integers(0, 13, 6)] = True
    got = np.asarray(dcc_losses.signed_distance(jnp.asarray(mask), max_distance=30), np.float64)
    pts = np.stack(np.meshgrid(np.arange(14), np.arange(13), indexing="ij"), -1).reshape(-1, 2)
    dist = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    flat = mask.reshape(-1)
    to_out = np.where(~flat[None], dist, np.inf).min(1)
    to_in = np.where(flat[None], dist, np.inf).min(1)
    exact = np.where(flat, to_out, to_in)
    chamfer = np.abs(got.reshape(-1)) + 0.5
    assert np.all(np.sign(got.reshape(-1)) == np.where(flat, 1, -1))
    assert np.all(chamfer >= exact - 1e-5) and np.all(chamfer <= 1.0825 * exact + 1e-5)
    capped = np.asarray(dcc_losses.signed_distance(jnp.asarray(mask), max_distance=2))
    np.testing.assert_allclose(capped, np.clip(got, -1.5, 1.5), atol=1e-6)


def test_label_probabilities_favour_the_label():
    labels = np.zeros((12, 12), int)
    labels[2:7, 3:9] = 1
    labels[8:11, 2:10] = 2
    p = np.asarray(dcc_losses.label_probabilities(jnp.asarray(labels), 3, tau=2.0))
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
    assert np.array_equal(p.argmax(-1), labels)
    assert p[4, 6, 1] > p[2, 3, 1] > 1 / 3  # deeper inside is more certain


@pytest.mark.parametrize("channels", [(), (3,)])
def test_warp_is_the_one_warp_on_the_unit_grid(channels):
    """The losses' warp is :func:`xjax.warp.warp` on DCC's unit grid (voxels = mm) with ``fill``
    outside the image, bit for bit, with and without jit, for points inside and outside."""
    rng = np.random.default_rng(4)
    values = jnp.asarray(rng.normal(size=(9, 7) + channels), jnp.float32)
    u = jnp.asarray(rng.uniform(-4, 4, (9, 7, 2)), jnp.float32)

    def one_warp(values, u):
        ref, inside = xjax.warp.warp(values, u, dcc.unit_grid((9, 7)))
        return jnp.where((inside[..., None] if channels else inside) > 0, ref, 0.25), inside

    for wrap in (lambda f: f, jax.jit):  # each compared within one mode (XLA may fuse differently)
        got, inside = wrap(lambda v, u: dcc_losses.warp(v, u, fill=0.25))(values, u)
        assert 0 < float(inside.sum()) < inside.size  # both kinds of points
        chex.assert_trees_all_equal((got, inside), wrap(one_warp)(values, u), strict=True)


# ---- gradients: which branch each loss reaches --------------------------------------------------

def test_hybrid_loss_gradient_paths(small_group):
    """Eq. (42)-(44): L2 reaches rho_hat only for images outside J, and phi for every image;
    L1 does not reach rho_hat (the posterior is detached) and L3 does not reach phi."""
    images, labels, probs, label_probs, prior = small_group
    labelled = np.array([True, False, True])
    group = dcc_losses.Group(jnp.asarray(images, jnp.float32), jnp.arange(3), jnp.asarray(labels),
                             jnp.asarray(label_probs, jnp.float32), jnp.asarray(labelled),
                             jnp.asarray(prior, jnp.float32))
    config = dcc_losses.LossConfig(num_classes=3, bins=8)
    disp = jnp.asarray(np.random.default_rng(1).uniform(-1.3, 1.3, (3, 9, 8, 2)), jnp.float32)
    p = jnp.asarray(probs, jnp.float32)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def grads(p, disp):
        terms = lambda p, d: dcc_losses.dcc_losses(p, d, group, config)
        return [jax.grad(lambda p, d: getattr(terms(p, d), name), argnums=(0, 1))(p, disp)
                for name in ("registration", "hybrid", "segmentation")]

    (l1_p, l1_u), (l2_p, l2_u), (l3_p, l3_u) = [[np.abs(np.asarray(g)).reshape(3, -1).sum(1) for g in pair]
                                                 for pair in grads(p, disp)]
    assert np.all(l2_u > 0)
    assert l2_p[0] == 0 and l2_p[2] == 0 and l2_p[1] > 0
    assert np.all(l1_p == 0) and np.all(l1_u > 0)
    assert np.all(l3_u == 0) and np.all(l3_p > 0)


def test_network_gradients_reach_the_branches_the_paper_says():
    """L3 never reaches the registration branch; L1 never reaches the segmentation decoder or head
    (only the shared encoder, through phi); L2 reaches the segmentation decoder only when some
    image is outside J."""
    model = _with_random_flow_heads(dcc.create(SHALLOW, seed=4), 4)
    graphdef, seg, reg = dcc_train.split_params(model)
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, (3,) + SPATIAL[2])
    images = jnp.asarray(rng.normal(size=(3,) + SPATIAL[2]) + labels, jnp.float32)
    label_probs = jax.nn.one_hot(labels, 3) * 0.7 + 0.1
    config = dcc_losses.LossConfig(num_classes=3, bins=8)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def grads(seg, reg, labelled):
        group = dcc_losses.Group(images, jnp.arange(3), jnp.asarray(labels), label_probs, labelled,
                                 jnp.full(SPATIAL[2] + (3,), 1 / 3))

        def terms(seg, reg):
            out = nnx.merge(graphdef, reg, seg)(images, group.modality)
            losses = dcc_losses.dcc_losses(out.probs, out.displacement, group, config)
            return jnp.stack([losses.registration, losses.hybrid, losses.segmentation])

        jac = jax.jacrev(terms, argnums=(0, 1))(seg, reg)  # leaves (3, ...): one row per term
        return {name: jax.tree.map(lambda leaf: leaf[i], jac) for i, name in
                enumerate(("registration", "hybrid", "segmentation"))}

    def size(tree, *names):
        parts = [tree[name] for name in names] if names else [tree]
        return sum(float(np.abs(np.asarray(leaf)).sum()) for part in parts for leaf in jax.tree.leaves(part))

    some = grads(seg, reg, jnp.array([True, False, False]))
    every = grads(seg, reg, jnp.array([True, True, True]))
    for g in (some, every):
        assert size(g["segmentation"][1]) == 0 and size(g["segmentation"][0]) > 0
        assert size(g["registration"][0], "seg_decoder", "seg_head") == 0
        assert size(g["registration"][0], "encoder") > 0 and size(g["registration"][1]) > 0
        assert size(g["hybrid"][1]) > 0
    assert size(some["hybrid"][0], "seg_decoder", "seg_head") > 0
    assert size(every["hybrid"][0], "seg_decoder", "seg_head") == 0


# ---- training ---------------------------------------------------------------------------------

def _tiny_dataset(strategy):
    groups = [phantoms.make_phantom(jax.random.key(i), (24, 24), num_modalities=3, num_classes=3) for i in range(3)]
    images = np.stack([np.asarray(g.images) for g in groups])
    labels = np.stack([np.broadcast_to(np.asarray(g.labels), (3, 24, 24)) for g in groups])
    config = dcc_train.TrainConfig(strategy=strategy, batch_size=2, seg_lr=3e-3, reg_lr=1e-3, alternate_every=2, seed=7)
    return dcc_train.make_dataset(images, labels, [0, 1, 2], 3, config), config


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    data, config = _tiny_dataset("DCC+BS")
    loss_config = dcc_losses.LossConfig(num_classes=3, bins=8)
    model = dcc.create(SHALLOW, seed=1)
    folder = tmp_path_factory.mktemp("dcc")
    straight = dcc_train.train(model, data, loss_config, config, 16, fast_compile=True, log_path=folder / "log.jsonl",
                               log_every=4)
    first = dcc_train.train(model, data, loss_config, config, 7, checkpoint_path=folder / "c.npz",
                            checkpoint_every=3, fast_compile=True)
    resumed = dcc_train.train(model, data, loss_config, config, 16, checkpoint_path=folder / "c.npz",
                              checkpoint_every=3, fast_compile=True)
    step = dcc_train.make_train_step(dcc_train.split_params(model)[0], loss_config, config, fast_compile=True)
    return dict(model=model, data=data, config=config, straight=straight, first=first, resumed=resumed,
                step=step, folder=folder)


def test_training_lowers_the_loss(training):
    """The loss of one fixed augmented batch (the metrics a step reports are computed before its
    update) is lower after 16 steps than at the start."""
    step, data, key = training["step"], training["data"], jax.random.key_data(jax.random.key(99))
    before = dcc_train.init_state(training["model"], training["config"])._replace(key=key)
    after = training["straight"][1]._replace(key=key)
    loss_before, loss_after = (float(step(s, data)[1]["total"]) for s in (before, after))
    assert loss_after < loss_before - 0.05, (loss_before, loss_after)


def test_resume_is_bit_exact_and_step_compiles_once(training):
    straight, resumed = training["straight"][1], training["resumed"][1]
    assert int(training["first"][1].step) == 7 and int(resumed.step) == 16
    chex.assert_trees_all_equal(straight, resumed, strict=True)
    assert training["step"]._cache_size() == 1


def test_metrics_log_and_alternation(training):
    import json
    lines = [json.loads(line) for line in open(training["folder"] / "log.jsonl")]
    assert [line["step"] for line in lines] == [4, 8, 12, 16]
    # with alternate_every=2, steps 1-2 update the segmentation branch, 3-4 registration, ...
    assert [line["phase"] for line in lines] == [1, 1, 1, 1]
    assert all(np.isfinite(line["total"]) for line in lines)
    state0 = dcc_train.init_state(training["model"], training["config"])
    one = training["step"](state0, training["data"])[0]
    changed = lambda a, b: any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert changed(one.seg_params, state0.seg_params) and not changed(one.reg_params, state0.reg_params)
    three = training["step"](training["step"](one, training["data"])[0], training["data"])[0]
    assert changed(three.reg_params, one.reg_params)


def test_predict_outputs():
    model = _with_random_flow_heads(dcc.create(SHALLOW, seed=2), 2)
    images = zscore(np.random.default_rng(0).normal(size=(3,) + SPATIAL[2]))
    graphdef, state = nnx.split(model)
    predict = dcc_train.make_predictor(graphdef, num_classes=3, bins=8, fast_compile=True)
    pred = predict(state, images, jnp.arange(3), jnp.zeros(3, bool), jnp.full(SPATIAL[2] + (3,), 1 / 3))
    chex.assert_shape(pred.posterior, SPATIAL[2] + (3,))
    chex.assert_shape(pred.segmentation, SPATIAL[2])
    np.testing.assert_allclose(np.asarray(pred.posterior).sum(-1), 1.0, atol=1e-5)
    assert np.array_equal(np.asarray(pred.segmentation), np.asarray(pred.posterior).argmax(-1))
    expected = jax.vmap(lambda im, u: dcc_losses.warp(im, u)[0])(images, pred.displacement)
    np.testing.assert_allclose(np.asarray(pred.warped), np.asarray(expected), atol=1e-5)


def test_dataset_validation():
    config = dcc_train.TrainConfig(strategy="DCC+All", ffd_spacings=(8.0,), ffd_per_spacing=1)
    with pytest.raises(ValueError, match="needs labels"):
        dcc_train.make_dataset(np.zeros((1, 2, 8, 8)), None, [0, 1], 2, config)
    with pytest.raises(ValueError, match="labels must lie"):
        dcc_train.make_dataset(np.zeros((1, 2, 8, 8)), np.full((1, 2, 8, 8), 2), [0, 1], 2, config)
    with pytest.raises(ValueError, match="modality"):
        dcc_train.make_dataset(np.zeros((1, 2, 8, 8)), np.zeros((1, 2, 8, 8)), [0, 1, 2], 2, config)


@pytest.mark.parametrize("half", [False, True])
def test_weights_round_trip(tmp_path, half):
    model = _with_random_flow_heads(dcc.create(SHALLOW, seed=3), 3)
    prior = jax.nn.softmax(jax.random.normal(jax.random.key(0), (6, 5, 3)), -1)
    dcc_train.save_weights(tmp_path / "w.npz", model, prior, {"strategy": "DCC+AT"}, half=half)
    loaded, got_prior, config = dcc_train.load_weights(tmp_path / "w.npz")
    assert config["strategy"] == "DCC+AT" and loaded.config == model.config
    assert np.array_equal(np.asarray(got_prior), np.asarray(prior))
    chex.assert_type(jax.tree.leaves(nnx.state(loaded)), jnp.float32)
    if half:
        chex.assert_trees_all_close(nnx.state(loaded), nnx.state(model), rtol=1e-3, atol=1e-4)
    else:
        chex.assert_trees_all_equal(nnx.state(loaded), nnx.state(model), strict=True)
