"""The BInGo experiments' quick modes: each runs end to end and writes its tables and figures."""

import sys
from pathlib import Path

import pytest

from conftest import DATA, need
from test_experiments import check_report, first_number

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

pytestmark = pytest.mark.slow


def test_phantoms_quick(tmp_path):
    import bingo_phantoms

    out = tmp_path / "bingo_phantoms.md"
    assert bingo_phantoms.main(["--quick", "--out", str(out)]) == 0
    methods, curve = check_report(out, ["bingo_phantoms_curve.png", "bingo_phantoms_example.png"])[:2]
    assert [r[0] for r in methods[1:]] == ["None", "BInGo (complete)", "BInGo (partial)", "X-CoReg"]
    before = first_number(methods[1][1])
    assert before > 1.0  # FFDs of +-8 mm: the misalignment is of millimetres
    assert all(0.0 <= first_number(r[3]) <= 100.0 for r in methods[1:])
    # The curve starts at the unregistered gWI and has a point per evaluation.
    assert [r[0] for r in curve[1:]] == ["0", "1", "2"]
    assert float(curve[1][1]) == pytest.approx(before, abs=1e-3)


@pytest.mark.data
def test_myops_quick(tmp_path):
    need(DATA / "myops2020")
    import bingo_myops

    out = tmp_path / "bingo_myops_quick.md"
    assert bingo_myops.main(["--quick", "--out", str(out)]) == 0
    groups, scale = check_report(out, [])[:2]
    assert [r[0] for r in groups[1:]] == ["BInGo (complete)", "BInGo (partial)", "X-CoReg",
                                          "DCC (DGR, 2 steps)"]
    assert all(first_number(r[1]) == first_number(groups[1][1]) > 1.0 for r in groups[1:])
    assert [r[0] for r in scale[1:]] == ["3"]


@pytest.mark.data
def test_mrus_quick(tmp_path):
    need(DATA / "mrus_prostate")
    import bingo_mrus

    out = tmp_path / "bingo_mrus.md"
    assert bingo_mrus.main(["--quick", "--out", str(out)]) == 0
    dice, seconds, setup = check_report(out, [])[:3]
    assert dice[0] == ["method", "M' = 2", "M' = 4"]
    assert [r[0] for r in dice[1:]] == ["None", "BInGo (partial)", "X-CoReg"]
    assert all(0.0 <= first_number(c) <= 100.0 for r in dice[1:] for c in r[1:])
    assert [r[0] for r in seconds[1:]] == ["BInGo (partial)", "X-CoReg"]
    assert [r[0] for r in setup[1:]] == ["X-CoReg"]
