"""Shared pieces of the experiments: statistics, markdown tables, figures, the machine, the data.

Statistics are the paper's: mean +- standard deviation over cases and the two-sided paired
t-test of each method against X-CoReg (Tables 2-4). The t-test's p-value uses the Student t
distribution written through the regularised incomplete beta function,
``P(|T| >= t) = I_{nu / (nu + t^2)}(nu / 2, 1 / 2)`` with ``nu = n - 1`` degrees of freedom.
"""

from __future__ import annotations

import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np

import xjax
from xjax import io, objectives, resample
from xjax.grid import Grid
from xjax.registration import pyramid

#: The shared data folder beside the checkout (``../shared/data``).
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
#: Where the experiments write their tables and figures.
RESULTS = Path(__file__).resolve().parent / "results"


# ---- statistics ----------------------------------------------------------------------------------

def mean_std(values) -> str:
    """``"mean +- std"`` of the finite values (sample standard deviation, ``ddof = 1``), 3 decimals;
    the count of non-finite values is appended when there are any."""
    x = np.asarray(values, np.float64).ravel()
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return "n/a"
    std = finite.std(ddof=1) if finite.size > 1 else 0.0
    text = f"{finite.mean():.3f} ± {std:.3f}"
    return text if finite.size == x.size else f"{text} ({x.size - finite.size} failed)"


def t_sf_two_sided(t, dof):
    """Two-sided tail ``P(|T| >= |t|)`` of Student's t with ``dof`` degrees of freedom:
    ``I_{dof / (dof + t^2)}(dof / 2, 1 / 2)`` (regularised incomplete beta), float64."""
    with jax.enable_x64(True):
        t = jnp.asarray(t, jnp.float64)
        dof = jnp.asarray(dof, jnp.float64)
        return float(jax.scipy.special.betainc(dof / 2, 0.5, dof / (dof + t * t)))


def paired_t_pvalue(a, b) -> float:
    """Two-sided p-value of the paired t-test of ``a`` against ``b`` (equal-length sequences).

    Pairs with a non-finite member are dropped. ``t = mean(d) / (std(d, ddof=1) / sqrt(n))`` with
    ``d = a - b`` and ``n - 1`` degrees of freedom. Returns NaN with fewer than two pairs; 1 when
    every difference is zero; 0 when the differences are equal and non-zero.
    """
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have equal lengths, got {a.size} and {b.size}")
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    n = d.size
    if n < 2:
        return math.nan
    sd = d.std(ddof=1)
    if sd == 0:
        return 1.0 if d.mean() == 0 else 0.0
    return t_sf_two_sided(d.mean() / (sd / math.sqrt(n)), n - 1)


def format_p(p: float) -> str:
    """A p-value for a table: ``< 1e-10``, 2 significant digits, or ``n/a``; an asterisk marks
    ``p < 0.05`` as in the paper's tables."""
    if not math.isfinite(p):
        return "n/a"
    star = "*" if p < 0.05 else ""
    return f"< 1e-10{star}" if p < 1e-10 else f"{p:.2g}{star}"


# ---- tables, figures, machine --------------------------------------------------------------------

def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table; every row must have ``len(header)`` cells."""
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {row!r} has {len(row)} cells, the header {len(header)}")
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """CPU model (from ``/proc/cpuinfo``), logical core count, JAX device and versions."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    dev = jax.devices()[0]
    return (f"{model}, {os.cpu_count()} logical cores, JAX device {dev.platform}, jax {jax.__version__}, "
            f"xjax {xjax.__version__}, Python {platform.python_version()}")


def command(script: str, argv: Sequence[str] | None) -> str:
    """The exact command line of an experiment run: ``python experiments/<script> <args>``."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", f"experiments/{script}"] + [shlex.quote(a) for a in args])


def write_text(path: Path, text: str) -> str:
    """Write ``text`` to ``path``, creating its directory. Returns the text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def write_report(path: Path, title: str, cmd: str, protocol: str, sections: Sequence[str]) -> str:
    """Write ``path`` (markdown): title, command, machine, how the run differs from the paper's
    protocol, then the sections. Returns the text."""
    text = "\n\n".join([f"# {title}", f"Command: `{cmd}`", f"Machine: {machine()}",
                        f"Protocol: {protocol}", *sections]) + "\n"
    return write_text(path, text)


def box_plot(path: Path, groups: Mapping[str, Sequence[float]], ylabel: str, title: str) -> None:
    """Box plots of the finite values of each named group, one box per group, saved as png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)
    data = [np.asarray(groups[k], np.float64)[np.isfinite(np.asarray(groups[k], np.float64))]
            for k in names]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(names), 3.6))
    ax.boxplot(data, tick_labels=names)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def image_rows(path: Path, rows: Mapping[str, np.ndarray], title: str) -> None:
    """A figure with one row per entry: the ``(N, X, Y)`` images of the row side by side (index
    axis 0 shown vertically, as in the arrays' (x, y) convention), saved as png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    n = max(np.asarray(r).shape[0] for r in rows.values())
    fig, axes = plt.subplots(len(names), n, figsize=(2.0 * n, 2.2 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        for j in range(n):
            ax = axes[i, j]
            ax.axis("off")
            if j < np.asarray(rows[name]).shape[0]:
                ax.imshow(np.asarray(rows[name][j], np.float64), cmap="gray")
        axes[i, 0].set_title(name, fontsize=9, loc="left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def timed(fn):
    """``(result, seconds)`` of ``fn()``, waiting for JAX's asynchronous results."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


# ---- data ----------------------------------------------------------------------------------------

def need(path: Path) -> Path:
    """``path`` if it exists, else a ValueError naming it (the shared data folder is missing)."""
    if not Path(path).exists():
        raise ValueError(f"data path {path} does not exist (the shared data folder beside the checkout)")
    return Path(path)


SPM12_MODALITIES = {"T1": "canonical/avg152T1.nii", "T2": "canonical/avg152T2.nii",
                    "PD": "canonical/avg152PD.nii", "EPI": "toolbox/OldNorm/EPI.nii",
                    "PET": "toolbox/OldNorm/PET.nii", "SPECT": "toolbox/OldNorm/SPECT.nii"}
SPM12_TISSUES = ("csf", "grey", "white")  # classes 1, 2, 3; 0 the background


def load_spm12(data: Path, names: Sequence[str], axial_slice: int | None = None):
    """The spm12 templates ``names`` (keys of :data:`SPM12_MODALITIES`) on their common 2 mm MNI
    grid, with tissue labels from the priors.

    Args:
      data: the shared data folder.
      names: modalities, e.g. ``("T1", "T2", "PD")``.
      axial_slice: ``None`` for the 3D volumes ``(91, 109, 91)``, or the index along the third
        (inferior-superior) axis of a 2D axial slice ``(91, 109)``.

    Returns:
      ``(images (N, *shape) float32, labels (*shape) int32, grid)``: label 0 where the three
      tissue priors sum to at most 0.5 (background), else ``1 + argmax`` over (CSF, grey, white).
    """
    folder = data / "spm12_templates"
    images, grids = [], []
    for name in names:
        if name not in SPM12_MODALITIES:
            raise ValueError(f"unknown spm12 modality {name!r}; choose from {sorted(SPM12_MODALITIES)}")
        image, grid = io.load_image(need(folder / SPM12_MODALITIES[name]))
        images.append(image)
        grids.append(grid)
    group, grid = resample.to_common_space(images, grids, 0)
    priors, _ = load_spm12_priors(data)
    if priors.shape[1:] != grid.shape:
        raise ValueError(f"tissue priors {priors.shape[1:]} are not on the template grid {grid.shape}")
    labels = np.where(priors.sum(0) > 0.5, 1 + priors.argmax(0), 0).astype(np.int32)
    if axial_slice is None:
        return group, labels, grid
    return group[..., axial_slice], labels[..., axial_slice], axial_plane(grid)


def load_spm12_priors(data: Path):
    """The spm12 tissue priors of :data:`SPM12_TISSUES` (``toolbox/OldSeg``): ``(3, 91, 109, 91)``
    probabilities and their grid (2 mm MNI)."""
    folder = data / "spm12_templates" / "toolbox" / "OldSeg"
    loaded = [io.load_image(need(folder / f"{t}.nii")) for t in SPM12_TISSUES]
    grid = loaded[0][1]
    if any(g != grid for _, g in loaded):
        raise ValueError("the spm12 tissue priors are not on one grid")
    return np.stack([v for v, _ in loaded]), grid


def load_mrus(pairs, slices, shape=(48, 64)):
    """Axial slices of the MR / transrectal-ultrasound prostate pairs (``DATA/mrus_prostate``).

    Each MR volume is resampled (linear; its gland label by nearest neighbour) onto its pair's
    ultrasound grid (1.5 mm, 47 x 63 x 44); every slice is zero-padded at the far end to ``shape``.

    Args:
      pairs: pair indices (0-107).
      slices: indices along the third axis of the ultrasound grid.
      shape: the padded 2D shape.

    Returns:
      ``(images (P, 2, *shape) float32, labels (P, 2, *shape) int32)``, [ultrasound, MR] per
      pair and slice (pair-major), the labels 1 on the gland.
    """
    folder = DATA / "mrus_prostate"

    def pad(a):
        out = np.zeros(a.shape[:-2] + tuple(shape), a.dtype)
        out[..., :a.shape[-2], :a.shape[-1]] = a
        return out

    images, labels = [], []
    for i in pairs:
        us, grid = io.load_image(folder / "fixed_images" / f"obs{i:03d}.nii.gz")
        mr, mr_grid = io.load_image(folder / "moving_images" / f"obs{i:03d}.nii.gz")
        lu = nib.load(folder / "fixed_labels" / f"obs{i:03d}.nii.gz").get_fdata()[..., 0] > 0.5
        lm = nib.load(folder / "moving_labels" / f"obs{i:03d}.nii.gz").get_fdata()[..., 0]
        mr = resample.pull_image(mr, mr_grid, grid)
        lm = resample.pull_image(lm, mr_grid, grid, order=0) > 0.5
        for z in slices:
            images.append(pad(np.stack([us[:, :, z], mr[:, :, z]])))
            labels.append(pad(np.stack([lu[:, :, z], lm[:, :, z]]).astype(np.int32)))
    return np.stack(images).astype(np.float32), np.stack(labels)


def axial_plane(grid: Grid) -> Grid:
    """The 2D grid of an axial slice (a plane of the first two axes) of an axis-aligned 3D grid."""
    a = grid.matrix
    if not (np.allclose(a[:2, 2], 0) and np.allclose(a[2, :2], 0)):
        raise ValueError("the grid is not axis aligned: axial slices are not x-y planes")
    return Grid(grid.shape[:2], a[np.ix_([0, 1, 3], [0, 1, 3])])


def block_average(image, grid: Grid, step: int):
    """``(image, grid)`` averaged over blocks of ``step^D`` voxels (``step`` a power of two; 1 keeps
    the grid), by :func:`xjax.registration.pyramid`; ``image`` is ``(*spatial)`` or ``(*spatial, C)``."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 1 or step & (step - 1):
        raise ValueError(f"the block size must be a power of two, got {step!r}")
    image, grid = pyramid(jnp.asarray(image), grid, step.bit_length())[-1]
    return np.asarray(image), grid


def zscore(images, mask=None):
    """Each image of ``(N, *shape)`` minus its mean, over its standard deviation (over ``mask``
    when given)."""
    images = np.asarray(images, np.float64)
    w = np.ones(images.shape[1:], bool) if mask is None else np.asarray(mask, bool)
    mean = np.array([im[w].mean() for im in images]).reshape((-1,) + (1,) * (images.ndim - 1))
    std = np.array([im[w].std() for im in images]).reshape(mean.shape)
    return ((images - mean) / std).astype(np.float32)


# ---- registration programs ----------------------------------------------------------------------

def compile_registration(images, grid: Grid, config, labels=None, mask=None):
    """Compile ``xjax.register(images, grid, config, key=key, labels=labels, mask=mask)`` ahead of
    time for groups shaped like ``images`` (and ``labels``, ``mask`` when given).

    Returns:
      ``(run, compile_seconds, planned_mib)``: ``run(images, key, labels=None, mask=None)`` returns
      the ``Result`` (pass ``labels`` and ``mask`` exactly when they were given here);
      ``planned_mib`` is XLA's planned working memory of the program (temporaries plus outputs).
    """

    def program(images, labels, mask, key):
        return xjax.register(images, grid, config, key=key, labels=labels, mask=mask)

    def array(a):
        return None if a is None else jnp.asarray(a)

    compiled, seconds = timed(lambda: jax.jit(program).lower(
        jnp.asarray(images), array(labels), array(mask), jax.random.key(0)).compile())
    stats = compiled.memory_analysis()
    mib = (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20

    def run(images, key, labels=None, mask=None):
        return compiled(jnp.asarray(images), array(labels), array(mask), key)

    return run, seconds, mib


#: The iterative methods the network experiments compare with: X-CoReg (the default objective),
#: APE and CTE, by the objective each puts in an :class:`xjax.Config`.
ITERATIVE_OBJECTIVES = {"X-CoReg": None, "APE": objectives.APE(), "CTE": objectives.CTE()}


def bingo_models(num_modalities: int, top_decoder_features: int = 16):
    """The BInGo experiments' 2D model (three levels) and the quick mode's small one (two levels).

    Returns:
      ``(model, quick)`` :class:`xjax.nn.bingo.BingoConfig` s.
    """
    from xjax.nn import bingo

    model = bingo.BingoConfig(ndim=2, num_modalities=num_modalities, features=(8, 16, 32), latent=4,
                              reg_features=16, decoder_features=(8, 16, top_decoder_features),
                              svf_steps=6)
    quick = bingo.BingoConfig(ndim=2, num_modalities=num_modalities, features=(4, 8), latent=2,
                              reg_features=8, decoder_features=(4, 8), svf_steps=4)
    return model, quick
