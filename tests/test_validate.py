"""Input checks: every bad input raises ValueError naming it; good input passes, also under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xjax.validate import check_bins, check_images, check_labels, check_mask, check_num_classes


def group(n=3, shape=(6, 5)):
    return np.random.default_rng(0).normal(size=(n,) + shape).astype(np.float32)


@pytest.mark.parametrize("as_jax", [False, True], ids=["numpy", "jax"])
def test_good_images_pass(as_jax):
    for images in (group(), group(2, (4, 5, 3))):
        check_images(jnp.asarray(images) if as_jax else images, names=[f"f{j}" for j in range(len(images))])


@pytest.mark.parametrize("shape,message", [
    ((1, 6, 5), "at least 2 images, got 1"),
    ((3, 4, 4, 4, 2), "4D input not supported"),
    ((3, 4, 4, 4, 2, 2), "5D input not supported"),
    ((6, 5), r"\(N, X, Y\) or \(N, X, Y, Z\); got shape \(6, 5\)"),
])
def test_bad_image_shapes(shape, message):
    with pytest.raises(ValueError, match=message):
        check_images(np.random.default_rng(0).random(shape))


@pytest.mark.parametrize("as_jax", [False, True], ids=["numpy", "jax"])
def test_non_finite_images_are_named_with_their_count(as_jax):
    images = group()
    images[1, 0, 0] = np.nan
    images[1, 2, 3] = np.inf
    images[2, 4, 4] = -np.inf
    images = jnp.asarray(images) if as_jax else images
    with pytest.raises(ValueError, match=r"image 1 \(b\.nii\) has 2 NaN/Inf voxels; "
                                         r"image 2 \(c\.nii\) has 1 NaN/Inf"):
        check_images(images, names=["a.nii", "b.nii", "c.nii"])
    with pytest.raises(ValueError, match="^image 1 has 2 NaN/Inf voxels"):
        check_images(images)


def test_constant_image_is_named():
    images = group()
    images[2] = 7.5
    with pytest.raises(ValueError, match=r"image 2 \(t2\) is constant \(every voxel is 7\.5\)"):
        check_images(images, names=["t1", "pd", "t2"])


def test_names_must_match_the_group():
    with pytest.raises(ValueError, match="2 names for 3 images"):
        check_images(group(), names=["a", "b"])


def test_non_numeric_images_are_rejected():
    with pytest.raises(ValueError, match="real numbers"):
        check_images(np.ones((2, 3, 3), bool))


def test_value_checks_are_skipped_under_jit_but_shapes_are_not():
    images = group()
    images[0, 0, 0] = np.nan

    @jax.jit
    def checked(x):
        check_images(x)
        return x.sum()

    assert np.isnan(checked(images))  # traced: no value check
    with pytest.raises(ValueError, match="at least 2 images"):
        checked(images[:1])

    def summed(x):
        check_images(x)
        return x.sum()

    batch = np.stack([images, images])  # two groups of three images
    assert np.all(np.isnan(jax.vmap(summed)(batch)))
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        jax.vmap(summed)(batch[:, :1])


def test_mask_checks():
    check_mask(np.ones((6, 5)), (6, 5))
    check_mask(jnp.zeros((6, 5)).at[2, 2].set(0.5), (6, 5))
    with pytest.raises(ValueError, match=r"mask of shape \(5, 6\) does not match .* \(6, 5\)"):
        check_mask(np.ones((5, 6)), (6, 5))
    bad = np.ones((6, 5))
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="mask has 1 NaN/Inf voxels"):
        check_mask(bad, (6, 5))
    with pytest.raises(ValueError, match="mask is empty"):
        check_mask(np.zeros((6, 5)), (6, 5))
    with pytest.raises(ValueError, match="non-negative, got a minimum of -2"):
        check_mask(np.ones((6, 5)) - 3 * np.eye(6, 5), (6, 5))
    traced = jax.jit(lambda m: (check_mask(m, (6, 5)), m.sum())[1])(np.zeros((6, 5)))
    assert float(traced) == 0.0


def test_label_checks():
    labels = np.random.default_rng(1).integers(0, 4, size=(3, 6, 5))
    check_labels(labels, (3, 6, 5))
    check_labels(labels[0], (3, 6, 5))  # one map shared by the group
    check_labels(labels.astype(np.float32), (3, 6, 5))  # integral floats are fine
    check_labels(jnp.asarray(labels), (3, 6, 5))
    with pytest.raises(ValueError, match=r"labels of shape \(3, 5, 6\) match neither"):
        check_labels(labels.transpose(0, 2, 1), (3, 6, 5))
    frac = labels.astype(np.float64)
    frac[2, 0, :3] = 0.5
    frac[2, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"label map 2 \(seg2\) has 4 non-integer"):
        check_labels(frac, (3, 6, 5), names=["seg0", "seg1", "seg2"])
    neg = labels.copy()
    neg[0, 0, 0] = -1
    with pytest.raises(ValueError, match="label map 0 has 1 negative values"):
        check_labels(neg, (3, 6, 5))
    with pytest.raises(ValueError, match="the label map has 1 negative values"):
        check_labels(neg[0], (3, 6, 5))
    jax.jit(lambda l: (check_labels(l, (3, 6, 5)), l)[1])(neg.astype(np.float32))


@pytest.mark.parametrize("value", [2, 3, np.int64(8)])
def test_num_classes_accepts_integers_from_two(value):
    check_num_classes(value)


@pytest.mark.parametrize("value", [1, 0, -3, 2.0, True, "4", None])
def test_num_classes_rejects(value):
    with pytest.raises(ValueError, match=f"number of classes K must be an integer >= 2, got {value!r}"):
        check_num_classes(value)


def test_bins():
    check_bins(4)
    check_bins(64)
    for value in (3, 0, 32.0, False):
        with pytest.raises(ValueError, match=f"intensity bins L must be an integer >= 4, got {value!r}"):
            check_bins(value)
