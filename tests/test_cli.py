"""The command line end to end on tiny images: every output file with the common grid's affine, the
warped images and labels against numpy references, errors with exit status 2 before any work, the
demo, and the progress bar."""

import dataclasses
import io
import json
import os
import subprocess
import sys

import jax
import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from xjax import phantoms, presets
from xjax.cli import main
from xjax.io import load_image
from xjax.grid import Grid
from xjax.progress import ProgressBar, null

SIZE = (32, 28)


def oblique2(spacing, angle, origin):
    a = np.eye(3)
    c, s = np.cos(angle), np.sin(angle)
    a[:2, :2] = np.array([[c, -s], [s, c]]) @ np.diag(spacing)
    a[:2, 2] = origin
    return Grid(SIZE, a)


REF = oblique2((1.0, 1.25), 0.3, (-14.0, -20.0))
# image 1 lies on the reference grid moved by (2, -1) voxels, with a finer y spacing
OTHER = Grid(SIZE, REF.matrix @ np.array([[1, 0, 2], [0, 0.9, -1], [0, 0, 1]]))


def save(path, array, grid, dtype=np.float32):
    nib.save(nib.Nifti1Image(np.asarray(array, dtype)[:, :, None], grid.to_nifti_affine()), str(path))
    return str(path)


def nifti(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def world_points(grid, disp):
    """World mm of every voxel of ``grid`` plus ``disp``, float64 ``(*shape, 2)``."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in grid.shape], indexing="ij"), -1)
    a = grid.matrix
    return idx @ a[:2, :2].T + a[:2, 2] + disp


def continuous_index(grid, world):
    inv = np.linalg.inv(grid.matrix)
    return world @ inv[:2, :2].T + inv[:2, 2]


def bilinear(image, idx):
    """numpy float64 reference: bilinear interpolation at continuous indices, 0 outside."""
    n = np.asarray(image.shape)
    inside = np.all((idx >= 0) & (idx <= n - 1), axis=-1)
    p = np.clip(idx, 0, n - 1)
    lo = np.minimum(np.floor(p).astype(int), n - 2)
    f = p - lo
    x0, y0, fx, fy = lo[..., 0], lo[..., 1], f[..., 0], f[..., 1]
    v = ((1 - fx) * (1 - fy) * image[x0, y0] + fx * (1 - fy) * image[x0 + 1, y0]
         + (1 - fx) * fy * image[x0, y0 + 1] + fx * fy * image[x0 + 1, y0 + 1])
    return np.where(inside, v, 0.0)


def safely_inside(idx, shape, margin=1e-3):
    n = np.asarray(shape)
    return np.all((idx >= margin) & (idx <= n - 1 - margin), axis=-1)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Two 2D phantom modalities on different oblique grids, registered by the CLI."""
    root = tmp_path_factory.mktemp("register")
    ph = phantoms.make_phantom(jax.random.key(1), SIZE, num_modalities=2)
    images = np.asarray(ph.images, np.float64)
    paths = [save(root / "a.nii.gz", images[0], REF), save(root / "b.nii.gz", images[1], OTHER)]
    labels = save(root / "labels_b.nii.gz", np.asarray(ph.labels), OTHER, dtype=np.int16)
    mask = save(root / "mask.nii.gz", np.asarray(ph.labels) > 0, OTHER)
    out = root / "out"
    argv = ["register", *paths, "-o", str(out), "--preset", "ffd", "--levels", "1",
            "--iterations", "3", "--spacing", "12", "--bins", "16", "--sample-rate", "0.5", "--seed", "3",
            "--init-posterior", "random", "--mask", mask, "--quiet"]
    assert main(argv) == 0
    return {"root": root, "out": out, "paths": paths, "images": images, "labels": labels,
            "label_values": np.asarray(ph.labels), "mask": mask}


def test_register_writes_every_output_on_the_common_grid(registered):
    out = registered["out"]
    assert sorted(os.listdir(out)) == sorted([
        "warped_0_a.nii.gz", "warped_1_b.nii.gz", "displacement_0_a.nii.gz",
        "displacement_1_b.nii.gz", "posterior.nii.gz", "segmentation.nii.gz", "report.json",
        "transforms.json"])
    assert not [p for p in os.listdir(registered["root"]) if p.startswith(".")]  # no temp dirs
    for name in os.listdir(out):
        if name.endswith(".nii.gz"):
            np.testing.assert_allclose(nifti(out / name)[1], REF.to_nifti_affine(), atol=1e-5)
    disp_img = nib.load(str(out / "displacement_1_b.nii.gz"))
    assert disp_img.shape == SIZE + (1, 1, 2)
    assert disp_img.header.get_intent()[0] == "vector"
    posterior, _ = nifti(out / "posterior.nii.gz")
    assert posterior.shape == SIZE + (1, 4)
    np.testing.assert_allclose(posterior.sum(-1), 1.0, atol=1e-3)
    segmentation, _ = nifti(out / "segmentation.nii.gz")
    assert segmentation.dtype == np.uint8
    np.testing.assert_array_equal(segmentation, np.argmax(posterior, axis=-1))


def test_warped_outputs_are_the_originals_sampled_once(registered):
    out, images = registered["out"], registered["images"]
    for j, (grid, stem) in enumerate([(REF, "a"), (OTHER, "b")]):
        disp = nifti(out / f"displacement_{j}_{stem}.nii.gz")[0][:, :, 0, 0, :].astype(np.float64)
        warped = nifti(out / f"warped_{j}_{stem}.nii.gz")[0][:, :, 0]
        idx = continuous_index(grid, world_points(REF, disp))
        expected = bilinear(images[j], idx)
        ok = safely_inside(idx, SIZE) | ~safely_inside(idx, SIZE, -1e-3)
        np.testing.assert_allclose(warped[ok], expected[ok], atol=1e-4)
        assert ok.mean() > 0.9


def test_report_and_transforms_describe_the_run(registered):
    out, paths = registered["out"], registered["paths"]
    report = json.loads((out / "report.json").read_text())
    config = dataclasses.replace(presets.get("ffd", levels=1, iterations=3, spacing=12.0, bins=16,
                                             sample_rate=0.5), init_posterior="random")
    assert report["settings"]["init_posterior"] == "random"
    assert report["settings"] == json.loads(json.dumps(config.to_dict(), default=str))
    assert len(report["loss_history"]) == config.total_steps == 3
    assert np.all(np.isfinite(report["loss_history"]))
    assert report["status"] == 0
    assert [i["path"] for i in report["inputs"]] == paths
    assert report["mask"] == registered["mask"]
    np.testing.assert_allclose(report["inputs"][1]["grid"]["affine"], OTHER.matrix)
    np.testing.assert_allclose(report["common_grid"]["affine"], REF.matrix)
    assert set(report["timings_s"]) == {"load", "compile_and_run", "write"}
    assert report["versions"]["jax"] == jax.__version__
    assert report["device"]
    transforms = json.loads((out / "transforms.json").read_text())
    assert [(t["index"], t["input"], t["displacement"]) for t in transforms["transforms"]] == [
        (0, paths[0], "displacement_0_a.nii.gz"), (1, paths[1], "displacement_1_b.nii.gz")]


def test_apply_labels_keeps_integers_and_the_common_grid(registered, tmp_path):
    out = registered["out"]
    dst = tmp_path / "labels_in_common.nii.gz"
    assert main(["apply", str(out), "--index", "1", registered["labels"], "-o", str(dst),
                 "--labels"]) == 0
    warped, affine = nifti(dst)
    assert np.issubdtype(warped.dtype, np.integer)
    np.testing.assert_allclose(affine, REF.to_nifti_affine(), atol=1e-5)
    disp = nifti(out / "displacement_1_b.nii.gz")[0][:, :, 0, 0, :].astype(np.float64)
    idx = continuous_index(OTHER, world_points(REF, disp))
    labels = registered["label_values"]
    nearest = labels[tuple(np.clip(np.round(idx), 0, np.asarray(SIZE) - 1).astype(int).T)].T
    expected = np.where(safely_inside(idx, SIZE, 0), nearest, 0)
    unambiguous = np.all(np.abs(idx - np.floor(idx) - 0.5) > 1e-3, axis=-1) & (
        safely_inside(idx, SIZE) | ~safely_inside(idx, SIZE, -1e-3))
    np.testing.assert_array_equal(warped[:, :, 0][unambiguous], expected[unambiguous])
    assert set(np.unique(warped)) <= set(np.unique(labels)) | {0}


def test_apply_reproduces_the_warped_outputs(registered, tmp_path):
    out, paths = registered["out"], registered["paths"]
    both = [str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz")]
    assert main(["apply", str(out), "--index", "0,1", *paths, "-o", *both]) == 0
    single = str(tmp_path / "b_from_file.nii.gz")
    assert main(["apply", str(out / "displacement_1_b.nii.gz"), paths[1], "-o", single]) == 0
    for produced, name in [(both[0], "warped_0_a.nii.gz"), (both[1], "warped_1_b.nii.gz"),
                           (single, "warped_1_b.nii.gz")]:
        np.testing.assert_array_equal(nifti(produced)[0], nifti(out / name)[0])


def test_apply_errors(registered, tmp_path, capsys):
    out, paths = registered["out"], registered["paths"]
    dst = str(tmp_path / "x.nii.gz")
    assert main(["apply", str(out), "--index", "2", paths[0], "-o", dst]) == 2
    assert "--index must be in [0, 2), got 2" in capsys.readouterr().err
    assert main(["apply", str(out), paths[0], "-o", dst]) == 2
    assert "is an output directory: give --index J" in capsys.readouterr().err
    assert main(["apply", str(out), "--index", "0,1", paths[0], "-o", dst]) == 2
    assert "one --index for all images or one per image" in capsys.readouterr().err
    volume = str(tmp_path / "volume.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.float32), np.eye(4)), volume)
    assert main(["apply", str(out), "--index", "0", volume, "-o", dst]) == 2
    assert f"{volume}: a 3D image cannot be warped by the 2D displacement" in capsys.readouterr().err
    open(dst, "w").write("keep me")
    assert main(["apply", str(out), "--index", "0", paths[0], "-o", dst]) == 2
    assert f"{dst} already exists" in capsys.readouterr().err
    assert open(dst).read() == "keep me"


def test_missing_input_fails_before_creating_the_output(registered, tmp_path, capsys):
    missing = str(tmp_path / "missing.nii.gz")
    out = tmp_path / "out"
    assert main(["register", registered["paths"][0], missing, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xjax: error: ") and f"{missing}: no such file" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_existing_output_needs_force(registered, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    argv = ["register", *registered["paths"], "-o", str(out), "--preset", "translation",
            "--iterations", "-5"]  # would be rejected too, but the output check comes first
    assert main(argv) == 2
    assert f"xjax: error: {out} already exists; pass --force" in capsys.readouterr().err
    assert os.listdir(out) == ["old.txt"]


@pytest.mark.parametrize("extra,message", [
    (["--preset", "rigid", "--spacing", "20"], "--spacing does not apply to the preset 'rigid'"),
    (["--classes", "1"], "number of classes K must be an integer >= 2, got 1"),
    (["--bins", "2"], "number of intensity bins L must be an integer >= 4, got 2"),
    (["--iterations", "0"], "--iterations must be >= 1, got 0"),
    (["--sample-rate", "1.5"], "--sample-rate must be in (0, 1], got 1.5"),
])
def test_bad_options_are_rejected(registered, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["register", *registered["paths"], "-o", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_inputs_are_named(registered, tmp_path, capsys):
    constant = save(tmp_path / "flat.nii.gz", np.full(SIZE, 3.0), REF)
    four_d = str(tmp_path / "four_d.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 2), np.float32), np.eye(4)), four_d)
    for bad, message in [(constant, f"({constant}) is constant"), (four_d, f"{four_d}: 4D data")]:
        assert main(["register", registered["paths"][0], bad, "-o", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err
    assert main(["register", registered["paths"][0], "-o", str(tmp_path / "o")]) == 2
    assert "at least 2 images, got 1" in capsys.readouterr().err
    empty = save(tmp_path / "empty.nii.gz", np.zeros(SIZE), OTHER)
    assert main(["register", *registered["paths"], "--mask", empty, "-o", str(tmp_path / "o")]) == 2
    assert f"{empty}: mask is empty" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_groups_directory_runs_as_one_batch_equal_to_separate_runs(tmp_path):
    """Three groups (two modalities each, on grids that differ only in their origin) registered by
    ``--groups``: every group's outputs carry its own affine, and its displacements equal a
    separate :func:`xjax.register` of that group with the key ``fold_in(key(seed), g)`` on the
    batch's grid (the first group's, as read from its file) to round-off, where another group's
    key gives other displacements."""
    import xjax
    root = tmp_path / "groups"
    stacks, grids = [], []
    for g in range(3):
        grid = Grid(SIZE, REF.matrix @ np.array([[1, 0, 3.0 * g], [0, 1, -2.0 * g], [0, 0, 1]]))
        ph = phantoms.make_phantom(jax.random.key(10 + g), SIZE, num_modalities=2)
        (root / f"case{g}").mkdir(parents=True)
        for j in range(2):
            save(root / f"case{g}" / f"m{j}.nii.gz", ph.images[j], grid)
        stacks.append(np.asarray(ph.images, np.float32))
        grids.append(grid)
    out = tmp_path / "out"
    argv = ["register", "--groups", str(root), "-o", str(out), "--preset", "ffd", "--levels", "1",
            "--iterations", "3", "--spacing", "12", "--bins", "16", "--seed", "5", "--quiet"]
    assert main(argv) == 0
    summary = json.loads((out / "report.json").read_text())
    assert [g["name"] for g in summary["groups"]] == ["case0", "case1", "case2"]
    config = presets.ffd(levels=1, iterations=3, spacing=12.0, bins=16)
    batch_grid = load_image(str(root / "case0" / "m0.nii.gz"))[1]  # as read back from the file
    for g in range(3):
        folder = out / f"case{g}"
        assert json.loads((folder / "report.json").read_text())["group"] == f"case{g}"
        images = (stacks[g] - stacks[g].mean(axis=(1, 2), keepdims=True)) / stacks[g].std(
            axis=(1, 2), keepdims=True)
        key = jax.random.fold_in(jax.random.key(5), g)
        alone = xjax.register(images, batch_grid, config, key=key).displacements
        other = xjax.register(images, batch_grid, config, key=jax.random.fold_in(jax.random.key(5), g + 1))
        disp = []
        for j in range(2):
            field, affine = nifti(folder / f"displacement_{j}_m{j}.nii.gz")
            np.testing.assert_allclose(affine, grids[g].to_nifti_affine(), atol=1e-5)
            disp.append(field[:, :, 0, 0, :])
        error = np.abs(np.stack(disp) - np.asarray(alone))
        assert error.max() < 1e-3, error.max()
        assert np.abs(np.stack(disp) - np.asarray(other.displacements)).mean() > 0.01


def test_groups_that_do_not_batch_are_named_and_nothing_is_written(tmp_path, capsys):
    root = tmp_path / "groups"
    for name, shape in (("a", SIZE), ("b", (30, 28))):
        (root / name).mkdir(parents=True)
        for j in range(2):
            save(root / name / f"m{j}.nii.gz", np.random.default_rng(j).random(shape), Grid.regular(shape))
    out = tmp_path / "out"
    assert main(["register", "--groups", str(root), "-o", str(out), "--quiet"]) == 2
    assert "group 'b'" in capsys.readouterr().err
    assert not out.exists()
    assert main(["register", "x.nii", "--groups", str(root), "-o", str(out)]) == 2
    assert "--groups" in capsys.readouterr().err


def test_usage_errors_exit_with_2(capsys):
    assert main(["register", "a.nii", "b.nii", "-o", "out", "--preset", "bspline"]) == 2
    assert "invalid choice: 'bspline'" in capsys.readouterr().err
    assert main([]) == 2
    assert main(["register", "--help"]) == 0
    assert "--reference" in capsys.readouterr().out


def test_python_dash_m_runs_the_same_main():
    run = subprocess.run([sys.executable, "-m", "xjax", "apply", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0
    assert "--labels" in run.stdout and "OUTDIR_OR_DISPLACEMENT" in run.stdout


def test_preset_and_init_names_match_the_core():
    """The parser repeats these names so that it imports no JAX; they must stay those of the core."""
    from xjax.cli import common
    from xjax.objectives import INITS

    assert common.PRESETS == presets.NAMES
    assert common.INITS == INITS


# Builds the parser and prints every help, then lists the heavy modules that were imported: the
# package's public names load on first use, so none should be.
_HELP_ONLY = """
import contextlib, io, os, sys
sys.path.insert(0, {root!r})
from xjax.cli import main
for argv in ([], ["register"], ["apply"], ["demo"], ["dcc"], ["dcc", "train"], ["dcc", "predict"],
             ["bingo"], ["bingo", "train"], ["bingo", "predict"]):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main([*argv, "--help"]) == 0
    assert "usage: xjax" in out.getvalue()
print(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "numpy", "flax", "nibabel")))
"""


def test_the_command_line_builds_its_parser_without_jax():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", _HELP_ONLY.format(root=root)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def class_dice(labels, num_classes):
    """numpy reference: Dice of each class 1..K-1 over all pairs, averaged (skipping absent)."""
    scores = []
    for k in range(1, num_classes):
        for a in range(len(labels)):
            for b in range(a + 1, len(labels)):
                x, y = labels[a] == k, labels[b] == k
                if x.sum() + y.sum():
                    scores.append(2 * np.sum(x & y) / (x.sum() + y.sum()))
    return np.mean(scores)


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--size", "48", "--iterations", "3", "--modalities", "2",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Dice" in printed and "gWI" in printed
    assert sorted(os.listdir(out)) == ["before_after.png", "demo.json", "inputs", "registration",
                                       "warped_labels_0.nii.gz", "warped_labels_1.nii.gz"]
    metrics = json.loads((out / "demo.json").read_text())
    before = np.stack([nifti(out / "inputs" / f"labels_{j}.nii.gz")[0][:, :, 0] for j in range(2)])
    after = np.stack([nifti(out / f"warped_labels_{j}.nii.gz")[0][:, :, 0] for j in range(2)])
    assert metrics["mean_class_dice"]["before"] == pytest.approx(class_dice(before, 4), abs=1e-6)
    assert metrics["mean_class_dice"]["after"] == pytest.approx(class_dice(after, 4), abs=1e-6)
    assert metrics["gwi_mm"]["before"] > 0 and np.isfinite(metrics["gwi_mm"]["after"])
    png = matplotlib.image.imread(str(out / "before_after.png"))
    assert png.ndim == 3 and min(png.shape[:2]) > 100
    assert main(["demo", "-o", str(out), "--size", "48", "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_file_prints_at_most_about_twenty_lines():
    stream = io.StringIO()
    bar = ProgressBar("reg", stream=stream)
    for i in range(1, 301):
        bar(i, 300, -0.5 * i)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert 15 <= len(lines) <= 21
    assert "\r" not in stream.getvalue()
    assert lines[-1].startswith("reg [" + "#" * 24 + "] 100%  300/300  loss -150")
    assert null(1, 2, 0.0) is None


def test_progress_bar_on_a_terminal_redraws_one_line():
    stream = Terminal()
    with ProgressBar(stream=stream, min_interval=0.0) as bar:
        bar(1, 4, 1.0)
        bar(2, 4, 0.5)
        bar(4, 4, 0.25)
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert " 50%  2/4  loss 0.5 " in text
    throttled = Terminal()
    with ProgressBar(stream=throttled, min_interval=3600.0) as bar:
        for i in range(1, 101):
            bar(i, 100, 0.0)
    assert throttled.getvalue().count("\r") == 2  # the first report and the last


def test_a_folded_registration_says_so_and_names_the_file(tmp_path, capsys):
    """Steps of 8 mm on a 4 mm mesh with no bending fold the transforms: exit status 1, a warning
    that names each folding input, status 3 and the per-image quality in report.json."""
    rng = np.random.default_rng(0)
    grid = Grid.regular((24, 20))
    paths = [save(tmp_path / f"noise_{j}.nii.gz", rng.normal(size=grid.shape), grid) for j in range(2)]
    out = tmp_path / "out"
    code = main(["register", *paths, "-o", str(out), "--preset", "ffd", "--spacing", "4", "--lr", "8",
                 "--bending", "0", "--levels", "1", "--iterations", "15", "--bins", "16",
                 "--sample-rate", "1", "--quiet"])
    err = capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert code == 1 and report["status"] == 3 and "folded" in err
    assert [q["path"] for q in report["quality"]] == paths
    for q in report["quality"]:
        assert q["folded_fraction"] > 0 and q["jacobian_min"] <= 0 and q["movement_p99"] >= q["movement_mean"] > 0
        assert f"{q['path']}: its transform folds on" in err


def test_one_spacing_per_ffd_level(tmp_path):
    """``--spacing 12 6`` gives a two-mesh FFD (one stage per mesh), as documented."""
    rng = np.random.default_rng(1)
    grid = Grid.regular((24, 20))
    paths = [save(tmp_path / f"n{j}.nii.gz", rng.normal(size=grid.shape), grid) for j in range(2)]
    out = tmp_path / "out"
    assert main(["register", *paths, "-o", str(out), "--preset", "ffd", "--spacing", "12", "6",
                 "--levels", "1", "--iterations", "2", "--bins", "16", "--quiet"]) == 0
    stages = json.loads((out / "report.json").read_text())["settings"]["stages"]
    assert [s["transform"] for s in stages] == ["BSplineFFD(spacing=12.0, mesh=None)",
                                                "BSplineFFD(spacing=6.0, mesh=None)"]


def listing(root):
    """Every file and directory under ``root`` (hidden ones included) with its bytes, to compare
    before and after a refused command."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            found[os.path.relpath(os.path.join(folder, d), root) + "/"] = None
        for f in files:
            path = os.path.join(folder, f)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


def test_an_output_that_is_holds_or_lies_inside_an_input_is_refused(registered, tmp_path, capsys):
    """``-o`` that is an input, holds one, or lies inside one (images, --mask, --groups, apply's
    source and images) is refused with --force too, before anything runs: nothing is written or
    removed."""
    case = tmp_path / "case"
    case.mkdir()
    a, b = save(case / "a.nii.gz", registered["images"][0], REF), save(case / "b.nii.gz", registered["images"][1], REF)
    mask = save(tmp_path / "mask.nii.gz", np.ones(SIZE), REF)
    groups = tmp_path / "groups"
    (groups / "g0").mkdir(parents=True)
    save(groups / "g0" / "m0.nii.gz", registered["images"][0], REF)
    save(groups / "g0" / "m1.nii.gz", registered["images"][1], REF)
    before = listing(tmp_path)
    fast = ["--preset", "translation", "--iterations", "2", "--levels", "1", "--quiet", "--force"]
    for argv, output, which in [
            (["register", a, b, "-o", str(case)], case, a),  # holds the inputs
            (["register", a, b, "-o", a], a, a),  # is an input
            (["register", a, b, "--mask", mask, "-o", mask], mask, mask),
            (["register", "--groups", str(groups), "-o", str(groups)], groups, groups),
            (["register", "--groups", str(groups), "-o", str(groups / "out")], groups / "out", groups),
            (["register", a, b, "-o", str(case / "a.nii.gz" / "out")], case / "a.nii.gz" / "out", a)]:
        assert main(argv + fast) == 2
        err = capsys.readouterr().err
        assert f"xjax: error: {output}" in err and f"the input {which}" in err, err
        assert listing(tmp_path) == before
    out = registered["out"]
    outputs = listing(out)
    for argv, output, which in [
            (["apply", str(out), "--index", "0", a, "-o", a], a, a),
            (["apply", str(out), "--index", "0", a, "-o", str(out)], out, out),
            (["apply", str(out), "--index", "0", a, "-o", str(out / "x.nii.gz")], out / "x.nii.gz", out)]:
        assert main(argv + ["--force"]) == 2
        err = capsys.readouterr().err
        assert f"xjax: error: {output}" in err and f"the input {which}" in err, err
        assert listing(tmp_path) == before and listing(out) == outputs


def test_force_never_replaces_a_file_by_a_directory(registered, tmp_path, capsys):
    """``--force`` replaces an existing output directory only: an existing regular file given as
    OUTDIR is refused, untouched."""
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    before = listing(tmp_path)
    assert main(["register", *registered["paths"], "-o", str(target), "--force", "--preset",
                 "translation", "--iterations", "2", "--levels", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"xjax: error: {target} is a file, not a directory" in err, err
    assert listing(tmp_path) == before


def test_an_unwritable_output_location_is_refused_before_loading(registered, tmp_path, capsys,
                                                                  monkeypatch):
    """An output whose parent is a regular file (or, when not root, a read-only directory) is
    refused before any input is loaded, for register and apply alike; nothing is written."""
    import xjax.io

    def no_loading(*args, **kwargs):
        raise AssertionError("an input was loaded before the output location was checked")

    monkeypatch.setattr(xjax.io, "load_image", no_loading)
    monkeypatch.setattr(xjax.io, "load_displacement", no_loading)
    blocker = tmp_path / "some_file.txt"
    blocker.write_text("x")
    cases = [(blocker / "out", f"{blocker} is not a directory")]
    if os.geteuid() != 0:  # root writes into read-only directories
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((locked / "out", f"{locked} is not writable"))
    before = listing(tmp_path)
    for output, message in cases:
        assert main(["register", *registered["paths"], "-o", str(output), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"xjax: error: cannot write {output}: {message}" in err, err
        assert main(["apply", str(registered["out"]), "--index", "0", registered["paths"][0],
                     "-o", str(output)]) == 2
        err = capsys.readouterr().err
        assert f"xjax: error: cannot write {output}: {message}" in err, err
        assert listing(tmp_path) == before


def test_apply_writes_all_outputs_or_none(registered, tmp_path, capsys, monkeypatch):
    """When the second output of ``xjax apply`` fails to write (here: a simulated full disk), the
    first is not left behind, and outputs replaced with --force keep their old contents."""
    import xjax.io

    real_save, calls = xjax.io.save_image, []

    def save_then_fail(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(path))
        real_save(path, *args, **kwargs)

    monkeypatch.setattr(xjax.io, "save_image", save_then_fail)
    paths, out = registered["paths"], str(registered["out"])
    first, second = tmp_path / "first.nii.gz", tmp_path / "second.nii.gz"
    assert main(["apply", out, "--index", "0,1", *paths, "-o", str(first), str(second)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert listing(tmp_path) == {}
    first.write_text("old first")
    second.write_text("old second")
    before, calls[:] = listing(tmp_path), []
    assert main(["apply", out, "--index", "0,1", *paths, "-o", str(first), str(second), "--force"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert listing(tmp_path) == before


def test_extreme_intensity_scales_register_and_beyond_float32_is_named(tmp_path, capsys):
    """Images scaled by 1e20, 1e30 or 1e-30 register like the unscaled ones (the z-score is taken
    without overflow or underflow); a float64 file beyond the float32 range is refused by name."""
    ph = phantoms.make_phantom(jax.random.key(4), (24, 20), num_modalities=2)
    grid = Grid.regular((24, 20))
    displacements = {}
    for scale in (1.0, 1e20, 1e30, 1e-30):
        paths = [save(tmp_path / f"s{j}_{scale:g}.nii.gz", np.asarray(ph.images[j], np.float64) * scale, grid,
                      dtype=np.float64) for j in range(2)]
        out = tmp_path / f"out_{scale:g}"
        assert main(["register", *paths, "-o", str(out), "--preset", "translation", "--iterations",
                     "3", "--levels", "1", "--bins", "16", "--quiet"]) == 0, capsys.readouterr().err
        displacements[scale] = nifti(out / f"displacement_1_s1_{scale:g}.nii.gz")[0]
    for scale in (1e20, 1e30, 1e-30):
        np.testing.assert_allclose(displacements[scale], displacements[1.0], atol=1e-3)
    huge = save(tmp_path / "huge.nii.gz", np.asarray(ph.images[0], np.float64) * 1e39, grid, dtype=np.float64)
    before = listing(tmp_path)
    assert main(["register", huge, str(tmp_path / "s1_1.nii.gz"), "-o", str(tmp_path / "o"), "--quiet"]) == 2
    assert f"xjax: error: {huge}: values beyond the float32 range" in capsys.readouterr().err
    assert listing(tmp_path) == before


def test_a_slab_thinner_than_four_voxels_is_refused_naming_its_shape(tmp_path, capsys):
    """Images of shape (X, Y, 2) exit with status 2 and name their shape; nothing is written."""
    rng = np.random.default_rng(2)
    affine = np.eye(4)
    paths = []
    for j in range(2):
        paths.append(str(tmp_path / f"slab{j}.nii.gz"))
        nib.save(nib.Nifti1Image(rng.normal(size=(16, 12, 2)).astype(np.float32), affine), paths[-1])
    before = listing(tmp_path)
    assert main(["register", *paths, "-o", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "xjax: error: " in err and "(16, 12, 2)" in err and "too thin along axis" in err, err
    assert "Traceback" not in err
    assert listing(tmp_path) == before
