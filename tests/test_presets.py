"""Typed presets: every name builds a valid configuration; knobs are checked."""

import pytest

import xjax
from xjax.transforms import Affine, BSplineFFD, Rigid, StationaryVelocity, Translation

EXPECTED = {
    "translation": [Translation],
    "rigid": [Translation, Rigid],
    "affine": [Translation, Affine],
    "ffd": [BSplineFFD],
    "rigid+ffd": [Translation, Rigid, BSplineFFD],
    "affine+ffd": [Translation, Affine, BSplineFFD],
    "svf": [StationaryVelocity],
}


@pytest.mark.parametrize("name", xjax.presets.NAMES)
def test_every_preset_builds_its_stages(name):
    config = xjax.presets.get(name)
    assert [type(s.transform) for s in config.stages] == EXPECTED[name]
    assert config.total_steps == sum(s.iterations * s.levels for s in config.stages)
    hash(config)  # static under jit


def test_knobs_reach_the_stages():
    config = xjax.presets.get("rigid+ffd", spacing=(40.0, 20.0), iterations=30, levels=3, bending=0.01,
                              num_classes=6, mode="reference", reference=2)
    ffd = [s for s in config.stages if isinstance(s.transform, BSplineFFD)]
    assert [s.transform.spacing for s in ffd] == [40.0, 20.0]
    assert all(s.bending == 0.01 and s.iterations == 30 and s.levels == 3 for s in ffd)
    assert (config.num_classes, config.mode, config.reference) == (6, "reference", 2)


def test_misspelt_knob_and_unknown_name_are_errors():
    with pytest.raises(TypeError):
        xjax.presets.get("ffd", spacings=20.0)
    with pytest.raises(ValueError, match="unknown preset"):
        xjax.presets.get("bspline")
    with pytest.raises(ValueError, match="mode"):
        xjax.presets.ffd(mode="biased")
