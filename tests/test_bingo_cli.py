"""``xjax bingo train`` and ``xjax bingo predict`` on NIfTI groups."""

import json
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest

from xjax import cli, phantoms
from xjax.io import save_image


def _write_groups(folder: Path):
    """Two misaligned 3-modality phantom groups (16 x 16, 2 mm) and a manifest; the second group
    lacks its third modality."""
    groups = []
    for g in range(2):
        phantom = phantoms.make_phantom(jax.random.key(g), (16, 16), spacing=2.0)
        images = np.asarray(phantoms.misaligned_group(jax.random.key(5 + g), phantom, spacing=16.0,
                                                      magnitude=2.0).images)
        paths = []
        for j in range(3):
            path = folder / f"g{g}_m{j}.nii.gz"
            save_image(path, images[j], phantom.grid)
            paths.append(path.name)
        groups.append({"images": paths if g == 0 else paths[:2] + [None]})
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"modalities": ["A", "B", "C"], "groups": groups}))
    return manifest


@pytest.mark.slow
def test_train_then_predict_a_larger_group(tmp_path, capsys):
    manifest = _write_groups(tmp_path)
    weights = tmp_path / "w.npz"
    argv = ["bingo", "train", str(manifest), "-o", str(weights), "--scheme", "partial",
            "--steps", "2", "--batch", "1", "--features", "4", "8", "--latent", "2",
            "--fast-compile", "--quiet"]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 2  # the weights exist: refused without --force
    assert "already exists" in capsys.readouterr().err
    images = sorted(str(p) for p in tmp_path.glob("g*_m*.nii.gz"))  # 6 images, any modality mix
    names = [Path(p).name[4] for p in images]
    modality = {"0": "A", "1": "B", "2": "C"}
    out = tmp_path / "out"
    assert cli.main(["bingo", "predict", str(weights), *images, "--modalities",
                     *[modality[n] for n in names], "-o", str(out), "--chunk", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["inputs"]) == 6 and report["chunk"] == 2
    for j, p in enumerate(images):
        stem = Path(p).name[: -len(".nii.gz")]
        disp = nib.load(out / f"displacement_{j}_{stem}.nii.gz")
        assert disp.shape == (16, 16, 1, 1, 2)
        assert np.all(np.isfinite(disp.get_fdata()))
        np.testing.assert_allclose(disp.affine, nib.load(images[0]).affine)
    assert nib.load(out / "common_structure.nii.gz").shape == (16, 16, 1, 2)
    # 'xjax apply' reads the transforms and reproduces a warped output
    again = tmp_path / "again.nii.gz"
    assert cli.main(["apply", str(out), "--index", "3", images[3], "-o", str(again)]) == 0
    stem = Path(images[3]).name[: -len(".nii.gz")]
    np.testing.assert_array_equal(nib.load(again).get_fdata(), nib.load(out / f"warped_3_{stem}.nii.gz").get_fdata())
    assert cli.main(["bingo", "predict", str(weights), images[0], "--modalities", "Z",
                     "-o", str(tmp_path / "bad")]) == 2
    assert "not among the trained" in capsys.readouterr().err
