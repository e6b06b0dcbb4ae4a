"""End-to-end X-CoReg: invariants, recovery of known misalignments, vmap, compiles, bad input."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xjax
from xjax import em, evaluate, phantoms, registration as register_module
from xjax.objectives import XMetric
from xjax.transforms import BSplineFFD, Translation

SIZE = 64


@pytest.fixture(scope="module")
def phantom():
    return phantoms.make_phantom(jax.random.key(0), (SIZE, SIZE), num_modalities=3)


def translation_config(**kw):
    stage = xjax.Stage(Translation(), **{"iterations": 60, "levels": 2, "learning_rate": 1.0, "bins": 32, **kw})
    return xjax.Config((stage,))


def shifted(phantom, shifts):
    """The phantom with image j pulled by the constant shift ``shifts[j]`` (mm)."""
    fields = jnp.broadcast_to(jnp.asarray(shifts, jnp.float32)[:, None, None, :], (3, SIZE, SIZE, 2))
    return phantoms.warp(phantom.images, phantom.grid, fields), fields


def test_identity_transform_leaves_images_unchanged(phantom):
    config = translation_config(iterations=3, levels=1, learning_rate=0.0)
    res = xjax.register(phantom.images, phantom.grid, config, key=jax.random.key(1))
    np.testing.assert_array_equal(res.displacements, 0.0)
    np.testing.assert_allclose(res.warped, phantom.images, atol=1e-6)
    assert int(res.status) == 0
    np.testing.assert_allclose(res.posterior.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(res.pi.sum(), 1.0, rtol=1e-5)


def test_translations_are_recovered(phantom):
    shifts = np.array([[2.5, -1.5], [-2.0, 2.0], [0.5, -1.0]])
    images, truth = shifted(phantom, shifts)
    res = xjax.register(images, phantom.grid, translation_config(), key=jax.random.key(2))
    # Unbiased: phi_j(x) = x + t_j with sum_j t_j = 0; truth pulls by s_j, so t_j = -(s_j - mean s).
    want = -(shifts - shifts.mean(0))
    np.testing.assert_allclose(res.params[0]["translation"], want, atol=0.3)
    np.testing.assert_allclose(np.asarray(res.params[0]["translation"]).sum(0), 0.0, atol=1e-5)
    assert evaluate.gwi(truth, res.displacements, phantom.grid, phantom.labels > 0) < 0.3


@dataclasses.dataclass(frozen=True)
class GroupVariance(xjax.Objective):
    """A user-written objective: minus the weighted sum over the sample of the intensity variance
    across the group (stateless: the protocol's defaults for init, update and to_grid)."""

    def similarity(self, state, values, weights, sample_index, lo, hi, bins):
        return -jnp.sum(weights * jnp.var(values, axis=0))


def test_any_objective_drives_the_registration(phantom):
    """One modality shifted three ways, registered by :class:`GroupVariance`: the shifts are
    recovered, and the result carries no posterior; labels (X-Reg-GT) are refused."""
    shifts = np.array([[2.0, -1.0], [-1.5, 1.5], [0.5, -0.5]])
    same = jnp.broadcast_to(phantom.images[0], phantom.images.shape)
    images = phantoms.warp(same, phantom.grid, shifted(phantom, shifts)[1])
    config = dataclasses.replace(translation_config(), objective=GroupVariance())
    res = xjax.register(images, phantom.grid, config, key=jax.random.key(4))
    assert res.posterior is None and res.pi is None
    np.testing.assert_allclose(res.params[0]["translation"], -(shifts - shifts.mean(0)), atol=0.3)
    with pytest.raises(ValueError, match="X-metric"):
        xjax.register(images, phantom.grid, config, key=jax.random.key(4),
                      labels=jnp.zeros(images.shape, jnp.int32))


def test_reference_mode_keeps_the_reference_fixed(phantom):
    shifts = np.array([[0.0, 0.0], [-2.0, 2.0], [1.5, -1.0]])
    images, _ = shifted(phantom, shifts)
    config = dataclasses.replace(translation_config(), mode="reference", reference=0)
    res = xjax.register(images, phantom.grid, config, key=jax.random.key(3))
    np.testing.assert_array_equal(res.displacements[0], 0.0)
    np.testing.assert_allclose(res.params[0]["translation"][1:], -shifts[1:], atol=0.3)


@pytest.fixture(scope="module")
def ffd_case(phantom):
    mis = phantoms.misaligned_group(jax.random.key(4), phantom, kind="ffd", spacing=24.0, magnitude=6.0)
    # Coefficients up to a quarter of the mesh spacing: the default bending weight (1.0, chosen to
    # keep aligned images still) holds back part of so large a deformation; 0.1 lets it through.
    config = xjax.presets.ffd(spacing=(24.0,), iterations=80, levels=2, learning_rate=0.5, bins=32,
                              sample_rate=0.25, bending=0.1)
    return mis, config


def test_ffd_misalignment_is_recovered(phantom, ffd_case):
    mis, config = ffd_case
    res = xjax.register(mis.images, phantom.grid, config, key=jax.random.key(5))
    fg = phantom.labels > 0
    before = evaluate.gwi(mis.displacements, jnp.zeros_like(mis.displacements), phantom.grid, fg)
    after = evaluate.gwi(mis.displacements, res.displacements, phantom.grid, fg)
    assert after < 0.4 * before, (before, after)
    warped_labels = phantoms.warp(mis.labels, phantom.grid, res.displacements, order=0)
    assert evaluate.pairwise_dice(warped_labels) > evaluate.pairwise_dice(mis.labels) + 0.02
    # Eq. (37): the group mean of the B-spline displacements is zero.
    np.testing.assert_allclose(res.displacements.mean(0), 0.0, atol=1e-4)
    # The loss falls: the metric rises.
    history = np.asarray(res.loss_history)
    assert history[-10:].mean() < history[:10].mean()


def test_ground_truth_appearance_variant(phantom, ffd_case):
    """X-Reg-GT (Eq. 48): appearance models from each image's own labels."""
    mis, config = ffd_case
    res = xjax.register(mis.images, phantom.grid, config, key=jax.random.key(6), labels=mis.labels)
    fg = phantom.labels > 0
    before = evaluate.gwi(mis.displacements, jnp.zeros_like(mis.displacements), phantom.grid, fg)
    assert evaluate.gwi(mis.displacements, res.displacements, phantom.grid, fg) < 0.5 * before
    # The posterior of the common anatomy matches the phantom's tissue map (up to the misalignment
    # left over): classes are identified, so no permutation is needed.
    agreement = np.mean(np.argmax(res.posterior, -1) == np.asarray(phantom.labels))
    assert agreement > 0.8


def test_vmap_over_groups_equals_separate_runs(phantom):
    """Equal up to round-off. (Over long runs, round-off differences between batched and
    unbatched kernels grow, as in any iterative optimisation, so a short run is compared.)"""
    shifts = np.array([[[1.5, -1.0], [-1.0, 1.0], [0.0, 0.5]], [[-1.0, 0.0], [1.0, 1.5], [0.5, -2.0]]])
    groups = jnp.stack([shifted(phantom, s)[0] for s in shifts])
    keys = jax.random.split(jax.random.key(7), 2)
    config = translation_config(iterations=3)
    batched = jax.vmap(lambda g, k: xjax.register(g, phantom.grid, config, key=k))(groups, keys)
    for b in range(2):
        single = xjax.register(groups[b], phantom.grid, config, key=keys[b])
        np.testing.assert_allclose(batched.displacements[b], single.displacements, atol=1e-3)
        np.testing.assert_allclose(batched.loss_history[b], single.loss_history, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(batched.posterior[b], single.posterior, atol=1e-3)
        np.testing.assert_array_equal(batched.status[b], single.status)


def test_one_trace_per_stage_and_level(phantom):
    config = xjax.Config((
        xjax.Stage(Translation(), iterations=4, levels=2, bins=16),
        xjax.Stage(BSplineFFD(spacing=30.0), iterations=3, levels=1, bins=16, bending=1e-3),
    ))
    before = register_module.TRACES["level"]
    res = xjax.register(phantom.images, phantom.grid, config, key=jax.random.key(8))
    assert register_module.TRACES["level"] - before == 3
    chex.assert_shape(res.loss_history, (4 * 2 + 3,))
    # A second run with other data and another key compiles nothing new.
    xjax.register(phantom.images[::-1], phantom.grid, config, key=jax.random.key(9))
    assert register_module.TRACES["level"] - before == 3


def test_progress_callback_reports_every_step(phantom):
    seen = []
    config = translation_config(iterations=5, levels=2)
    res = xjax.register(phantom.images, phantom.grid, config, key=jax.random.key(10),
                        progress=lambda done, total, loss: seen.append((done, total, loss)))
    jax.block_until_ready(res)
    jax.effects_barrier()
    assert sorted(s[0] for s in seen) == list(range(1, 11))
    assert all(s[1] == 10 for s in seen)
    np.testing.assert_allclose(sorted(seen)[-1][2], res.loss_history[-1], rtol=1e-5)


def test_any_optax_transform_and_status_reports_failure(phantom):
    ok = translation_config(iterations=5, levels=1, optimizer=optax.sgd(0.5))
    res = xjax.register(phantom.images, phantom.grid, ok, key=jax.random.key(11))
    assert int(res.status) == 0
    bad = translation_config(iterations=5, levels=1, optimizer=optax.sgd(float("nan")))
    res = xjax.register(phantom.images, phantom.grid, bad, key=jax.random.key(11))
    assert int(res.status) == 1
    # Steps of about a million mm carry the images out of each other's field of view.
    far = translation_config(iterations=5, levels=1, optimizer=optax.sgd(1e6))
    res = xjax.register(phantom.images, phantom.grid, far, key=jax.random.key(11))
    assert int(res.status) == 2 and "overlap" in xjax.config.STATUS[2]


def _numpy_quality(u, region):
    """float64 numpy reference of ``Result.quality`` for displacements ``(N, X, Y, 2)`` in mm on a
    1 mm grid: Jacobian by ``np.gradient`` (central inside, one-sided at the border)."""
    out = {"jacobian_min": [], "folded_fraction": [], "movement_mean": [], "movement_p99": []}
    for field in np.asarray(u, np.float64):
        grads = np.gradient(field, axis=(0, 1))  # d u / d x_a, each (X, Y, 2)
        jac = np.eye(2) + np.stack(grads, axis=-1)  # [..., c, a] = delta + d u_c / d x_a
        det = np.linalg.det(jac)[region]
        length = np.linalg.norm(field, axis=-1)[region]
        out["jacobian_min"].append(det.min())
        out["folded_fraction"].append(np.mean(det <= 0))
        out["movement_mean"].append(length.mean())
        out["movement_p99"].append(np.percentile(length, 99))
    return {k: np.asarray(v) for k, v in out.items()}


def test_folding_is_reported_in_status_and_quality():
    """Steps of 8 mm on a 4 mm mesh with no bending fold the transforms: status 3, and the quality
    fields equal a numpy reference (over a mask: the voxels it selects)."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, 24, 20)), jnp.float32)
    grid = xjax.Grid.regular((24, 20))
    mask = np.zeros((24, 20))
    mask[3:20, 2:17] = 1.0
    stage = xjax.Stage(BSplineFFD(spacing=4.0), iterations=15, learning_rate=8.0, bins=16,
                       sample_rate=1.0)
    res = xjax.register(images, grid, xjax.Config((stage,)), key=jax.random.key(0), mask=mask)
    want = _numpy_quality(res.displacements, mask > 0)
    chex.assert_shape(list(res.quality), (2,))
    for name, value in want.items():
        np.testing.assert_allclose(getattr(res.quality, name), value, rtol=1e-4, atol=1e-5, err_msg=name)
    assert np.all(want["folded_fraction"] > 0) and int(res.status) == 3
    assert "folded" in xjax.config.STATUS[3]


def test_an_unfolded_registration_has_status_0_and_its_quality(phantom):
    res = xjax.register(phantom.images, phantom.grid, translation_config(iterations=5, levels=1),
                        key=jax.random.key(3))
    assert int(res.status) == 0
    np.testing.assert_allclose(res.quality.jacobian_min, 1.0, atol=1e-5)  # translations
    np.testing.assert_allclose(res.quality.folded_fraction, 0.0)
    length = np.linalg.norm(np.asarray(res.displacements), axis=-1).reshape(3, -1)
    np.testing.assert_allclose(res.quality.movement_mean, length.mean(1), rtol=1e-5)


def test_pyramid_averages_blocks():
    image = jnp.arange(35.0).reshape(5, 7)
    grid = xjax.Grid.regular((5, 7))
    (full, g0), (half, g1) = register_module.pyramid(image, grid, 2)
    padded = np.pad(np.asarray(image), ((0, 1), (0, 1)), mode="edge")
    want = padded.reshape(3, 2, 4, 2).mean((1, 3))
    np.testing.assert_allclose(half, want)
    assert g1 == grid.downsample(2)
    # Each coarse voxel centre is the centre of the 2x2 block it averages.
    np.testing.assert_allclose(g1.index_to_world_np(np.array([1.0, 2.0])),
                               grid.index_to_world_np(np.array([2.5, 4.5])))


@pytest.mark.parametrize("case", ["one image", "nan", "constant", "4d", "empty mask", "labels", "classes",
                                  "bins", "grid", "reference", "thin"])
def test_bad_input_is_named(phantom, case):
    images = np.asarray(phantom.images)
    kwargs = {}
    config = translation_config(iterations=1, levels=1)
    grid = phantom.grid
    if case == "one image":
        images, match = images[:1], "at least 2"
    elif case == "nan":
        images = images.copy()
        images[1, 3, 4] = np.nan
        match = "image 1"
    elif case == "constant":
        images = images.copy()
        images[2] = 1.0
        match = "image 2"
    elif case == "4d":
        images, match = np.zeros((2, 4, 4, 4, 4)), "4D"
    elif case == "empty mask":
        kwargs["mask"], match = np.zeros((SIZE, SIZE)), "mask"
    elif case == "labels":
        kwargs["labels"], match = np.zeros((3, SIZE, SIZE - 1), np.int32), "labels"
    elif case == "classes":
        with pytest.raises(ValueError, match="class"):
            dataclasses.replace(config, num_classes=1)
        return
    elif case == "bins":
        with pytest.raises(ValueError, match="bins"):
            xjax.Stage(Translation(), bins=3)
        return
    elif case == "grid":
        grid, match = xjax.Grid.regular((SIZE, SIZE + 1)), "grid"
    elif case == "thin":  # a 3D slab one voxel thick along y
        images = np.random.default_rng(0).normal(size=(2, 8, 1, 8))
        grid, match = xjax.Grid.regular((8, 1, 8)), r"too thin along axis \[1\]"
    else:
        config, match = dataclasses.replace(config, mode="reference", reference=5), "reference"
    with pytest.raises(ValueError, match=match):
        xjax.register(images, grid, config, key=jax.random.key(0), **kwargs)


def test_posterior_initialisation_is_chosen_by_name(phantom):
    """``init_posterior`` selects the X-metric's start: the paper's softmax of noise (Eq. 22) or
    k-means classes; anything else is refused by name."""
    images = jnp.asarray(phantom.images).reshape(3, -1)
    weights = jnp.ones(images.shape[1])
    key = jax.random.key(4)
    config = xjax.presets.translation(num_classes=3)
    random_start = dataclasses.replace(config, init_posterior="random").metric.init(key, images, weights)
    np.testing.assert_array_equal(random_start.em.posterior, em.init_em(key, images.shape[1], 3).posterior)
    kmeans_start = config.metric.init(key, images, weights)
    np.testing.assert_array_equal(kmeans_start.em.posterior,
                                  em.init_em_kmeans(key, images, weights, 3).posterior)
    for make in (lambda: dataclasses.replace(config, init_posterior="kmeans++"),
                 lambda: XMetric(init_posterior="zeros")):
        with pytest.raises(ValueError, match="init_posterior must be one of"):
            make()


def test_step_problem_is_the_first_step_of_register(phantom):
    """``step_problem`` gives the loss that ``register`` differentiates: one SGD step of size 1 from
    identity moves the (Eq. 37 projected) FFD parameters by exactly minus its gradient."""
    stage = xjax.Stage(BSplineFFD(spacing=16.0), iterations=1, levels=1, bins=32, sample_rate=0.2,
                       optimizer=optax.sgd(1.0))
    config = xjax.Config((stage,))
    key = jax.random.key(5)
    problem = register_module.step_problem(phantom.images, phantom.grid, config, key=key)
    (loss, _), grads = jax.value_and_grad(problem.loss, has_aux=True)(
        problem.params, problem.state, problem.drawn)
    res = xjax.register(phantom.images, phantom.grid, config, key=key)
    np.testing.assert_allclose(float(loss), float(res.loss_history[0]), rtol=1e-6)
    moved = jax.tree.map(lambda p, i: p - i, res.params[0], problem.params)
    chex.assert_trees_all_close(moved, jax.tree.map(jnp.negative, grads), rtol=1e-5, atol=1e-7)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0


def test_intensity_ranges_are_the_percentiles():
    flat = np.random.default_rng(0).standard_cauchy(size=(3, 500))
    lo, hi = register_module.intensity_ranges(jnp.asarray(flat, jnp.float32), (0.5, 99.5))
    np.testing.assert_allclose(lo, np.percentile(flat, 0.5, axis=1), rtol=1e-5)
    np.testing.assert_allclose(hi, np.percentile(flat, 99.5, axis=1), rtol=1e-5)
    lo, hi = register_module.intensity_ranges(jnp.asarray(flat, jnp.float32), (0.0, 100.0))
    np.testing.assert_array_equal(lo, np.float32(flat).min(axis=1))
    np.testing.assert_array_equal(hi, np.float32(flat).max(axis=1))
    with pytest.raises(ValueError, match="percentiles"):
        xjax.Config((xjax.Stage(Translation()),), intensity_range=(50.0, 40.0))


def test_a_hot_voxel_does_not_move_an_aligned_pair(phantom):
    """Two aligned modalities, one voxel of one of them at 1e6: with the robust Parzen range
    (percentiles 0.5 / 99.5, the default) the pair stays where it is; with the image's min / max as
    the range (the paper's), every other intensity falls into the lowest bins and the pair drifts."""
    images = np.asarray(phantom.images[:2]).copy()
    images[1, 20, 30] = 1e6
    config = translation_config(iterations=40, levels=1)
    robust = xjax.register(images, phantom.grid, config, key=jax.random.key(4))
    paper = xjax.register(images, phantom.grid, dataclasses.replace(config, intensity_range=(0.0, 100.0)),
                          key=jax.random.key(4))
    assert float(robust.quality.movement_mean.max()) < 0.25, robust.quality
    assert float(paper.quality.movement_mean.max()) > 4 * float(robust.quality.movement_mean.max()), paper.quality
