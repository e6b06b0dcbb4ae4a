"""The registration-quality suite (experiments/suite/run.py) in --quick mode writes a complete, sane table."""
import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "spm12_templates"


def _load():
    spec = importlib.util.spec_from_file_location("suite_run", ROOT / "experiments" / "suite" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not DATA.exists(), reason="shared spm12 data missing")
def test_quick_suite_writes_sane_table(tmp_path):
    suite = _load()
    path = suite.main(["--quick", "--out", str(tmp_path)])
    text = path.read_text()
    assert "Command:" in text and "Machine:" in text and "Load average" in text
    lines = [l for l in text.splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == suite.HEADER
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in lines[2:]]
    expected = len(suite.XJAX_METHODS) + (len(suite.ELASTIX_METHODS) if suite.HAVE_ITK else 0)
    assert len(rows) == expected
    for row in rows:
        cell = dict(zip(header, row))
        nums = {k: float(v) for k, v in cell.items() if k not in ("case", "method", "status")}
        assert all(math.isfinite(v) for v in nums.values()), row
        assert nums["movement mean mm"] >= 0 and nums["movement p99 mm"] >= nums["movement mean mm"]
        assert 0 <= nums["folded fraction"] <= 1 and 0 <= nums["Dice"] <= 1
        assert nums["gWI mm"] >= 0 and nums["wall s"] > 0
        # every method must at least not make the known FFD misalignment much worse
        assert nums["gWI mm"] < 1.5 * nums["gWI mm (before)"], row
    if suite.HAVE_ITK:  # the LPS/RAS-style conversion of elastix's field was checked by warping
        note = text.split("converted field ")[1]
        right = float(note.split()[0])
        wrong = float(note.split("negated field ")[1].split(")")[0])
        assert right < wrong
