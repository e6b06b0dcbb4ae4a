"""What the sub-commands of ``xjax`` share: option checking, the preset with its overrides, the
report's settings, versions and device, the exit status of a finished registration, the persistent
compilation cache, and the argument types of ``--reference`` and ``--index``.

Nothing here imports JAX when the module is imported: the parser is built, and ``--help`` answers,
without it; the functions that need JAX or the core of xjax import them when they run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import sys

__all__ = [
    "CONFIG_OVERRIDES",
    "INITS",
    "OVERRIDES",
    "PRESETS",
    "check_options",
    "enable_compilation_cache",
    "environment",
    "finished",
    "label_dtype",
    "parse_indices",
    "parse_reference",
    "preset_config",
    "settings",
]

#: command-line option -> keyword of the :mod:`xjax.presets` factories it sets.
OVERRIDES = {
    "classes": "num_classes",
    "bins": "bins",
    "iterations": "iterations",
    "levels": "levels",
    "spacing": "spacing",
    "lr": "learning_rate",
    "bending": "bending",
    "sample_rate": "sample_rate",
}
#: command-line option -> field of :class:`xjax.Config` it sets, whatever the preset.
CONFIG_OVERRIDES = {"init_posterior": "init_posterior"}

#: :data:`xjax.presets.NAMES`, repeated so that building the parser imports no JAX (a test checks
#: that the two agree).
PRESETS = ("translation", "rigid", "affine", "ffd", "rigid+ffd", "affine+ffd", "svf")
#: :data:`xjax.objectives.INITS`, repeated for the same reason.
INITS = ("kmeans", "random")


def preset_config(preset: str, options: dict):
    """The preset with the options given; an option the preset has no knob for is an error."""
    from xjax import presets

    if preset not in presets.NAMES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(presets.NAMES)}")
    knobs, fields = {}, {}
    for option, value in options.items():
        if value is None:
            continue
        if option in CONFIG_OVERRIDES:
            fields[CONFIG_OVERRIDES[option]] = value
            continue
        try:
            presets.get(preset, **{OVERRIDES[option]: value})
        except TypeError:
            flag = "--" + option.replace("_", "-")
            raise ValueError(f"{flag} does not apply to the preset {preset!r}") from None
        knobs[OVERRIDES[option]] = value
    return dataclasses.replace(presets.get(preset, **knobs), **fields)


def check_options(options: dict) -> None:
    """Host-side checks of the numeric options, before anything is loaded."""
    from xjax.validate import check_bins, check_num_classes

    if options.get("classes") is not None:
        check_num_classes(options["classes"])
    if options.get("bins") is not None:
        check_bins(options["bins"])
    for name in ("iterations", "levels"):
        if options.get(name) is not None and options[name] < 1:
            raise ValueError(f"--{name} must be >= 1, got {options[name]}")
    for name in ("spacing", "lr"):
        value = options.get(name)
        values = value if isinstance(value, (tuple, list)) else (value,)
        if value is not None and not all(v > 0 for v in values):
            raise ValueError(f"--{name} must be > 0, got {value}")
    if options.get("bending") is not None and not options["bending"] >= 0:
        raise ValueError(f"--bending must be >= 0, got {options['bending']}")
    if options.get("sample_rate") is not None and not 0 < options["sample_rate"] <= 1:
        raise ValueError(f"--sample-rate must be in (0, 1], got {options['sample_rate']}")


def environment() -> dict:
    """The report entries ``versions`` (xjax, jax) and ``device`` (the first JAX device)."""
    import jax

    return {"versions": {"xjax": importlib.metadata.version("xjax"), "jax": jax.__version__},
            "device": str(jax.devices()[0])}


def settings(preset: str, options: dict | None, reference, seed: int):
    """The config of the preset with the options, and the report's settings entries."""
    options = dict(options or {})
    known = set(OVERRIDES) | set(CONFIG_OVERRIDES)
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; known: {sorted(known)}")
    check_options(options)
    config = preset_config(preset, options)
    return config, {
        "reference": reference, "preset": preset, "seed": seed, "settings": config.to_dict(),
        **environment(),
    }


def quality_report(paths, quality) -> list[dict]:
    """One entry per input of :class:`xjax.config.Quality`: its Jacobian determinant minimum,
    folded fraction and movement (mean and 99th percentile, mm)."""
    import numpy as np

    fields = {name: np.asarray(value, np.float64) for name, value in quality._asdict().items()}
    return [{"path": path, **{name: float(value[j]) for name, value in fields.items()}}
            for j, path in enumerate(paths)]


def _warn_folded(report: dict) -> None:
    """Name each input whose transform folds (status 3), with how much of it."""
    for entry in report.get("quality", []):
        if entry["folded_fraction"] > 0:
            print(f"xjax: warning: {entry['path']}: its transform folds on "
                  f"{100 * entry['folded_fraction']:.3g}% of the common grid (least Jacobian "
                  f"determinant {entry['jacobian_min']:.3g}); raise --bending or use a coarser "
                  f"--spacing", file=sys.stderr)


def finished(report: dict, outdir: str, quiet: bool) -> int:
    """Print how a registration ended (a warning on stderr if it failed, else a summary unless
    ``quiet``); returns the exit status, 1 for a failed registration."""
    from xjax.config import STATUS

    if report["status"] != 0:
        status = report["status"]
        print(f"xjax: warning: the registration failed (status {status}: "
              f"{STATUS.get(status, 'see the report')}); outputs written to {outdir}", file=sys.stderr)
        _warn_folded(report)
        return 1
    if not quiet:
        t = report["timings_s"]
        print(f"registered {len(report['inputs'])} images into {outdir} (load {t['load']:.1f} s, "
              f"compile and run {t['compile_and_run']:.1f} s, write {t['write']:.1f} s)")
    return 0


def label_dtype(labels):
    """The smallest numpy integer dtype that holds every value of the label array ``labels``."""
    import numpy as np

    lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    return np.result_type(np.min_scalar_type(lo), np.min_scalar_type(hi))


def enable_compilation_cache() -> None:
    """Keep compiled registration programs between runs, so that repeated commands with the same
    shapes and settings skip compilation: in ``$XJAX_CACHE_DIR`` if set (empty: no cache), else
    in ``$XDG_CACHE_HOME/xjax`` or ``~/.cache/xjax``. Only ``--quiet`` runs profit: JAX does not
    store programs that report progress through host callbacks."""
    path = os.environ.get("XJAX_CACHE_DIR")
    if path is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "xjax")
    if path:
        import jax

        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def parse_reference(text: str) -> int | str:
    """``--reference``: an image index, or ``"bounds"``."""
    if text == "bounds":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an image index or 'bounds', got {text!r}") from None


def parse_indices(text: str) -> list[int]:
    """``--index``: ``J`` or ``J1,J2,...``."""
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected J or J1,J2,..., got {text!r}") from None
