"""The exact-truth MR simulator of xjax.phantoms against independent float64 references."""

import jax
import numpy as np
import pytest
from scipy import special

from xjax import phantoms
from conftest import DATA, need

T = phantoms.MR_TISSUES


def test_spin_echo_matches_brute_force():
    for k in range(1, len(T)):
        t1, t2, _, pd = (float(v) for v in T[k])
        ref = pd * (1.0 - np.exp(-3300.0 / t1)) * np.exp(-120.0 / t2)
        assert np.isclose(phantoms.spin_echo(pd, t1, t2, 3300.0, 120.0), ref, rtol=1e-12)


def test_spgr_matches_brute_force():
    for k in range(1, len(T)):
        t1, _, t2s, pd = (float(v) for v in T[k])
        a = 30.0 * np.pi / 180.0
        e1 = np.exp(-18.0 / t1)
        ref = pd * np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1) * np.exp(-10.0 / t2s)
        assert np.isclose(phantoms.spoiled_gradient_echo(pd, t1, t2s, 18.0, 10.0, 30.0), ref,
                          rtol=1e-12)


def test_contrast_ordering():
    s = phantoms.protocol_signals(("T1", "T2", "PD"))
    csf, gm, wm = 1, 2, 3
    assert s[0, wm] > s[0, gm] > s[0, csf]
    assert s[1, csf] > s[1, gm] > s[1, wm]
    assert s[2, csf] > s[2, gm] > s[2, wm]
    assert np.all(s[:, 0] == 0)


def test_fuzzy_mixing_is_weighted_sum():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=(6, 5))[..., 1:]  # classes 1..3, background the rest
    s = phantoms.protocol_signals()
    out = phantoms.tissue_images(p, s)
    for n in range(3):
        ref = (1 - p.sum(-1)) * s[n, 0] + sum(p[..., k - 1] * s[n, k] for k in (1, 2, 3))
        np.testing.assert_allclose(out[n], ref, rtol=1e-12, atol=1e-15)
    img, lab = phantoms.simulate_mr(jax.random.key(0), p, noise=0.0, inu=0.0)
    np.testing.assert_allclose(img, out, rtol=1e-6, atol=1e-7)
    assert lab.shape == (6, 5)


def test_rician_statistics():
    a, sigma = 2.0, 1.0
    x = phantoms.rician_noise(jax.random.key(1), np.full((400, 500), a), sigma)
    nu = -a * a / (2 * sigma * sigma)
    # Laguerre L_{1/2}(x) = exp(x/2) [(1 - x) I0(-x/2) - x I1(-x/2)]
    lag = np.exp(nu / 2) * ((1 - nu) * special.i0(-nu / 2) - nu * special.i1(-nu / 2))
    ref = sigma * np.sqrt(np.pi / 2) * lag
    assert abs(x.mean() - ref) < 5 * x.std() / np.sqrt(x.size)
    b = phantoms.rician_noise(jax.random.key(2), np.zeros((400, 500)), sigma)
    assert abs(b.mean() - sigma * np.sqrt(np.pi / 2)) < 5 * b.std() / np.sqrt(b.size)


def test_inu_range():
    f = phantoms.inu_field(jax.random.key(3), (32, 40), 20.0)
    assert np.isclose(f.min(), 0.9) and np.isclose(f.max(), 1.1)
    assert np.all(phantoms.inu_field(jax.random.key(3), (8, 8), 0.0) == 1)


def test_deterministic_and_labels():
    labels = np.zeros((24, 24), np.int32)
    labels[4:20, 4:20], labels[8:16, 8:16], labels[10:14, 10:14] = 1, 2, 3
    a = phantoms.simulate_mr(jax.random.key(5), labels)
    b = phantoms.simulate_mr(jax.random.key(5), labels)
    c = phantoms.simulate_mr(jax.random.key(6), labels)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (3, 24, 24) and a[0].dtype == np.float32
    np.testing.assert_array_equal(a[1], labels)


def test_voxelmorph_labels():
    seg = np.load(need(DATA / "voxelmorph" / "test_seg.npz"))["vol_data"]
    sl = seg[:, :, seg.shape[2] // 2].astype(np.int32)
    img, lab = phantoms.simulate_mr(jax.random.key(0), sl, mapping=phantoms.FREESURFER_TISSUE,
                                    noise=0.0, inu=0.0)
    assert set(np.unique(lab)) <= {0, 1, 2, 3} and {1, 2, 3} <= set(np.unique(lab))
    means = [[img[n][lab == k].mean() for k in (1, 2, 3)] for n in range(3)]
    assert means[0][2] > means[0][1] > means[0][0]   # T1w: WM > GM > CSF
    assert means[1][0] > means[1][1] > means[1][2]   # T2w: CSF > GM > WM
    assert np.all(img[:, lab == 0] == 0)
