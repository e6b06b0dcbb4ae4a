"""The DCC experiment: quick mode on the real MR/ultrasound pairs writes its table, and the
synthetic spm12 groups are built from the tissue priors as documented."""

import importlib.util
from pathlib import Path

import jax
import numpy as np
from conftest import DATA, need

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("dcc_table5", ROOT / "experiments" / "dcc_table5.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_experiment_writes_a_table(tmp_path):
    need(DATA / "mrus_prostate")
    module = _module()
    rows = module.main(["--data", "mrus", "--quick", "--strategies", "DCC+BS", "--out", str(tmp_path)])
    text = (tmp_path / "dcc_mrus_quick.md").read_text()
    assert [r["method"] for r in rows] == ["None", "DCC+BS", "X-CoReg (iterative FFD)"]
    assert "| DCC+BS |" in text and "Machine:" in text and "Command:" in text
    assert all(0.0 <= d <= 1.0 for r in rows for d in r["reg"])


def test_spm12_groups_are_partial_volume_mixtures_of_the_priors():
    """The spm12 groups: priors resampled to 64 x 64 sum to one, labels are their argmax and the
    same for the three images, and without bias and noise each image is the prior-weighted mix
    of its modality's class means, whose order differs between modalities (non-monotone)."""
    need(DATA / "spm12_templates" / "toolbox" / "OldSeg")
    module = _module()
    priors = module.spm12_priors((30, 44))
    assert priors.shape == (2, 64, 64, 4)
    assert np.allclose(priors.sum(-1), 1.0, atol=1e-2)
    assert all((np.bincount(p.argmax(-1).ravel(), minlength=4) > 0).all() for p in priors)

    key = jax.random.key(0)
    images, labels = module.synthesise_spm12(priors, key, 2)
    assert images.shape == labels.shape == (4, 3, 64, 64)
    assert (labels == labels[:, :1]).all()
    assert (labels[::2, 0] == priors.argmax(-1)).all() and (labels[1::2, 0] == priors.argmax(-1)).all()
    assert not np.allclose(images[0], images[1])  # bias and noise drawn per group

    clean, _ = module.synthesise_spm12(priors, key, 1, bias=0.0, noise=0.0)
    table = np.stack([[clean[0, m][labels[0, 0] == k].mean() for k in range(4)] for m in range(3)])
    np.testing.assert_allclose(clean, np.moveaxis(priors @ module.phantoms.TISSUE_TABLE.T, -1, 1), atol=1e-5)
    assert len({tuple(np.argsort(row[1:])) for row in table}) == 3
