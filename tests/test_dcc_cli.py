"""The ``xjax dcc`` command: train on a NIfTI manifest, predict a group, outputs usable by
``xjax apply``; bad input gives exit status 2."""

import json

import jax
import nibabel as nib
import numpy as np
import pytest

from xjax import cli, phantoms
from xjax.nn import dcc
from xjax.cli import dcc as dcc_command
from xjax.grid import Grid
from xjax.io import save_image
from xjax.nn.dcc import train as dcc_train


def test_strategies_match_the_training_module():
    assert dcc_command.STRATEGIES == dcc_train.STRATEGIES


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dcc_cli")
    # the shapes and settings of test_dcc's training fixture: a full run reuses its compiled step
    grid = Grid.regular((24, 24), 1.5)
    groups = []
    for i in range(3):
        ph = phantoms.make_phantom(jax.random.key(i), grid.shape, num_modalities=3, num_classes=3)
        entry = {"images": [], "labels": [f"lab_{i}.nii.gz", None, None]}
        for j in range(3):
            save_image(folder / f"img_{i}_{j}.nii.gz", np.asarray(ph.images[j]), grid)
            entry["images"].append(f"img_{i}_{j}.nii.gz")
        save_image(folder / f"lab_{i}.nii.gz", np.asarray(ph.labels), grid, dtype=np.int16)
        groups.append(entry)
    (folder / "manifest.json").write_text(json.dumps({"modalities": ["A", "B", "C"], "groups": groups}))
    return folder


def test_train_then_predict(manifest, tmp_path):
    weights = tmp_path / "w.npz"
    args = ["dcc", "train", str(manifest / "manifest.json"), "-o", str(weights), "--strategy", "DCC+BS",
            "--classes", "3", "--steps", "2", "--batch", "2", "--width", "2", "--levels", "1", "--bins", "8",
            "--seg-lr", "3e-3", "--reg-lr", "1e-3", "--alternate", "2",
            "--log", str(tmp_path / "log.jsonl"), "--fast-compile", "--quiet"]
    assert cli.main(args) == 0
    assert cli.main(args) == 2  # the weights exist and --force is absent
    out = tmp_path / "pred"
    images = [str(manifest / f"img_0_{j}.nii.gz") for j in range(3)]
    assert cli.main(["dcc", "predict", str(weights), *images, "-o", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["strategy"] == "DCC+BS" and report["modalities"] == ["A", "B", "C"]
    seg = nib.load(out / "segmentation.nii.gz")
    post = nib.load(out / "posterior.nii.gz").get_fdata()
    assert seg.shape[:2] == (24, 24) and post.shape[:2] == (24, 24) and post.shape[-1] == 3
    np.testing.assert_allclose(post.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_allclose(seg.affine, nib.load(images[0]).affine)
    disp = np.squeeze(nib.load(out / report["outputs"][1]["displacement"]).get_fdata())
    assert disp.shape == (24, 24, 2)
    # 'xjax apply' reads the transforms and reproduces the warped image
    applied = tmp_path / "applied.nii.gz"
    assert cli.main(["apply", str(out), images[1], "-o", str(applied), "--index", "1"]) == 0
    np.testing.assert_allclose(np.squeeze(nib.load(applied).get_fdata()),
                               np.squeeze(nib.load(out / report["outputs"][1]["warped"]).get_fdata()), atol=1e-4)
    assert cli.main(["dcc", "predict", str(weights), *images[:2], "-o", str(tmp_path / "x"), "--quiet"]) == 2


def test_bad_manifest_is_reported(tmp_path, capsys):
    (tmp_path / "m.json").write_text(json.dumps({"groups": []}))
    assert cli.main(["dcc", "train", str(tmp_path / "m.json"), "-o", str(tmp_path / "w.npz"), "--quiet"]) == 2
    assert "non-empty" in capsys.readouterr().err


def test_truncated_or_foreign_weights_are_named(manifest, tmp_path, capsys):
    """A truncated ``.npz`` (dcc predict, bingo predict, a resumed training) and DCC weights given
    to BInGo (and the converse) exit with status 2 naming the file and what is wrong; nothing is
    written or removed."""
    import os
    from pathlib import Path

    from xjax.nn import bingo
    from xjax.nn.bingo import train as bingo_train

    weights = tmp_path / "weights"
    weights.mkdir()
    dcc_weights, bingo_weights = weights / "dcc.npz", weights / "bingo.npz"
    dcc_model = dcc.create(dcc.DCCConfig(ndim=2, num_classes=3, num_modalities=3, width=2, levels=1,
                                         flow_scales=1))
    dcc_train.save_weights(dcc_weights, dcc_model, np.full((24, 24, 3), 1 / 3),
                           {"strategy": "DGR", "modalities": ["A", "B", "C"], "labelled": [0, 0, 0],
                            "loss": {"bins": 8, "num_classes": 3}})
    bingo_train.save_model(bingo_weights, bingo.create(bingo.BingoConfig(features=(4,), latent=2,
                                                                       decoder_features=(4,))),
                           extra={"modalities": ["A", "B", "C"]})
    truncated = weights / "truncated.npz"
    truncated.write_bytes(dcc_weights.read_bytes()[:200])
    images = [str(manifest / f"img_0_{j}.nii.gz") for j in range(3)]
    out = tmp_path / "out"

    def listing():
        return {os.path.join(d, f): (Path(d) / f).read_bytes() for d, _, files in os.walk(tmp_path)
                for f in files}

    before = listing()
    for argv, message in [
            (["dcc", "predict", str(truncated), *images, "-o", str(out)],
             f"{truncated}: not a readable xjax weights file"),
            (["bingo", "predict", str(truncated), *images, "--modalities", "A", "B", "C", "-o", str(out)],
             f"{truncated}: not a readable xjax weights file"),
            (["dcc", "train", str(manifest / "manifest.json"), "-o", str(tmp_path / "w.npz"), "--classes",
              "3", "--steps", "1", "--width", "2", "--levels", "1", "--checkpoint", str(truncated)],
             f"{truncated}: not a readable xjax weights file"),
            (["bingo", "predict", str(dcc_weights), *images, "--modalities", "A", "B", "C", "-o", str(out)],
             f"{dcc_weights} holds DCC weights, not BInGo weights"),
            (["dcc", "predict", str(bingo_weights), *images, "-o", str(out)],
             f"{bingo_weights} holds BInGo weights, not DCC weights")]:
        assert cli.main(argv + ["--quiet"] * (argv[:2] != ["bingo", "predict"])) == 2, argv
        err = capsys.readouterr().err
        assert f"xjax: error: {message}" in err and "Traceback" not in err, err
        assert listing() == before
