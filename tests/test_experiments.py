"""The experiments' shared statistics against scipy and numpy, and every experiment's quick mode."""

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, need

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import common  # noqa: E402


# ---- statistics ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, shift, seed", [(2, 0.3, 0), (5, 0.0, 1), (20, 0.4, 2), (50, -0.05, 3), (8, 3.0, 4)])
def test_paired_t_pvalue_matches_scipy(n, shift, seed):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    a = rng.normal(size=n)
    b = a + shift + rng.normal(scale=0.5, size=n)
    expected = stats.ttest_rel(a, b).pvalue
    assert common.paired_t_pvalue(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert common.paired_t_pvalue(b, a) == pytest.approx(expected, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("t, dof", [(0.0, 1), (0.7, 3), (-2.5, 10), (12.0, 40), (1e-3, 1000)])
def test_two_sided_t_tail_matches_scipy(t, dof):
    stats = pytest.importorskip("scipy.stats")
    assert common.t_sf_two_sided(t, dof) == pytest.approx(2 * stats.t.sf(abs(t), dof), rel=1e-9, abs=1e-300)


def test_paired_t_pvalue_edge_cases():
    assert common.paired_t_pvalue([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0
    assert common.paired_t_pvalue([1.0, 2.0, 3.0], [0.0, 1.0, 2.0]) == 0.0
    assert math.isnan(common.paired_t_pvalue([1.0], [2.0]))
    # Pairs with a non-finite member are dropped.
    a, b = np.array([1.0, 2.5, np.nan, 4.0, 3.0]), np.array([1.2, 2.0, 1.0, 3.1, 3.3])
    keep = np.isfinite(a)
    assert common.paired_t_pvalue(a, b) == common.paired_t_pvalue(a[keep], b[keep])
    with pytest.raises(ValueError, match="equal lengths"):
        common.paired_t_pvalue([1.0, 2.0], [1.0, 2.0, 3.0])


def test_mean_std_and_table():
    x = np.array([1.0, 2.0, 4.0, np.nan])
    finite = x[:3]
    assert common.mean_std(x) == f"{finite.mean():.3f} ± {finite.std(ddof=1):.3f} (1 failed)"
    assert common.mean_std([np.nan]) == "n/a"
    assert common.markdown_table(["a", "b"], [[1, 2]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |"]
    with pytest.raises(ValueError, match="cells"):
        common.markdown_table(["a", "b"], [[1]])
    assert common.format_p(0.01) == "0.01*" and common.format_p(0.2) == "0.2"
    assert common.format_p(1e-12) == "< 1e-10*" and common.format_p(math.nan) == "n/a"


def test_block_average_and_zscore():
    from xjax.grid import Grid

    rng = np.random.default_rng(0)
    image = rng.normal(size=(8, 4, 6))
    grid = Grid.regular(image.shape, 1.5)
    out, coarse = common.block_average(image, grid, 2)
    expected = image.reshape(4, 2, 2, 2, 3, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(coarse.spacing, 3.0)
    np.testing.assert_allclose(coarse.index_to_world_np(np.zeros(3)), grid.index_to_world_np(np.full(3, 0.5)))
    same, _ = common.block_average(image, grid, 1)
    np.testing.assert_allclose(same, image, rtol=1e-6)
    for bad in (0, 3, 2.0):
        with pytest.raises(ValueError, match="power of two"):
            common.block_average(image, grid, bad)
    z = common.zscore(np.stack([image, 3 * image + 2]))
    np.testing.assert_allclose(z.mean(axis=(1, 2, 3)), 0.0, atol=1e-6)
    np.testing.assert_allclose(z.std(axis=(1, 2, 3)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(z[0], z[1], atol=1e-5)


# ---- quick modes ---------------------------------------------------------------------------------

def tables(text: str):
    """The markdown tables of ``text``: lists of rows of stripped cells (header first)."""
    blocks, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    out = []
    for block in blocks:
        assert re.fullmatch(r"\|(---\|)+", block[1]), block[1]
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in block[:1] + block[2:]]
        assert len(rows) >= 2 and len({len(r) for r in rows}) == 1, block
        assert len(rows[0]) == block[1].count("---")
        out.append(rows)
    return out


def first_number(cell: str) -> float:
    return float(re.match(r"-?[0-9.]+", cell).group())


def check_report(path: Path, figures):
    text = path.read_text()
    assert "Command: `python experiments/" in text and "--quick" in text
    assert "Machine: " in text and "jax " in text and "Protocol: " in text
    for figure in figures:
        assert (path.parent / figure).stat().st_size > 1000
    found = tables(text)
    assert found
    return found


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")


def test_brainweb_quick(out):
    need(DATA / "spm12_templates")
    import exp_brainweb

    assert exp_brainweb.main(["--quick", "--out", str(out)]) == 0
    per_magnitude = check_report(out / "exp_brainweb.md", ["exp_brainweb_box.png", "exp_brainweb_example.png"])[0]
    methods = [r[0] for r in per_magnitude[1:]]
    assert methods == ["None", "X-Reg-UN"]
    assert all(first_number(r[1]) >= 0 for r in per_magnitude[1:])
    assert first_number(per_magnitude[1][1]) > 0.5  # the misalignment is of millimetres


def test_scaling_quick(out):
    import exp_scaling

    assert exp_scaling.main(["--quick", "--out", str(out)]) == 0
    per_step, ratios = check_report(out / "exp_scaling.md", ["exp_scaling.png"])[:2]
    assert [(r[0], r[1]) for r in per_step[1:]] == [("2", "X-CoReg"), ("2", "APE")]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in per_step[1:])
    ms = {r[1]: float(r[2]) for r in per_step[1:]}
    assert ratios[1][0] == "2"
    assert float(ratios[1][1]) == pytest.approx(ms["APE"] / ms["X-CoReg"], rel=0.02, abs=0.01)


def test_rire_quick(out):
    need(DATA / "spm12_templates")
    import exp_rire

    assert exp_rire.main(["--quick", "--out", str(out)]) == 0
    group = check_report(out / "exp_rire.md", ["exp_rire_box.png"])[0]
    assert [r[0] for r in group[1:]] == ["None", "X-CoReg"]
    assert first_number(group[1][1]) > 5.0  # rotations up to 15 degrees and shifts up to 20 mm
    assert group[2][2] == "1.00" and group[2][3] == "1.00"


def test_moco_quick(out):
    need(DATA / "qperf_perfusion")
    import exp_moco

    assert exp_moco.main(["--quick", "--out", str(out)]) == 0
    rows = check_report(out / "exp_moco.md", ["exp_moco_box.png", "exp_moco_example.png"])[0]
    assert [(r[0], r[1]) for r in rows[1:]] == [("none", "None"), ("translation", "X-CoReg")]
    for r in rows[1:]:
        assert 0.0 <= first_number(r[2]) <= 1.0 and 0.0 <= first_number(r[4]) <= 1.0
        assert first_number(r[6]) >= 0.0


def test_tcga_quick(out):
    need(DATA / "brats" / "TCGA-FG-6692")
    import exp_tcga

    assert exp_tcga.main(["--quick", "--out", str(out)]) == 0
    rows = check_report(out / "exp_tcga.md", [])[0]
    assert [r[0] for r in rows[1:]] == ["T1 → T1c", "T1 → T2", "T1 → FLAIR"]
    for r in rows[1:]:
        for cell in r[1:]:
            rms, worst = (float(v) for v in cell.split(" / "))
            assert 0.0 <= rms <= worst
