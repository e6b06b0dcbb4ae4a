"""The DCC experiment's quick mode runs on the real MR/ultrasound pairs and writes its table."""

import importlib.util
from pathlib import Path

from conftest import DATA, need

ROOT = Path(__file__).resolve().parents[1]


def test_quick_experiment_writes_a_table(tmp_path):
    need(DATA / "mrus_prostate")
    spec = importlib.util.spec_from_file_location("dcc_table5", ROOT / "experiments" / "dcc_table5.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--data", "mrus", "--quick", "--strategies", "DCC+BS", "--out", str(tmp_path)])
    text = (tmp_path / "dcc_mrus_quick.md").read_text()
    assert [r["method"] for r in rows] == ["None", "DCC+BS", "X-CoReg (iterative FFD)"]
    assert "| DCC+BS |" in text and "Machine:" in text and "Command:" in text
    assert all(0.0 <= d <= 1.0 for r in rows for d in r["reg"])
