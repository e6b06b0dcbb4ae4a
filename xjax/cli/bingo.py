"""The ``xjax bingo`` command: train BInGo on NIfTI groups, and register groups of any size with it.

``xjax bingo train MANIFEST -o WEIGHTS.npz`` reads a JSON manifest::

    {"modalities": ["bSSFP", "LGE", "T2"],
     "groups": [{"images": ["a_C0.nii.gz", "a_DE.nii.gz", null]}, ...]}

(paths relative to the manifest; ``null`` for a missing modality, allowed with ``--scheme
partial``). Image ``j`` of a group has modality ``j``. Each group is resampled onto the grid of
its first image (:func:`xjax.resample.to_common_space`), and all groups must then share one shape.
Intensities go to [0, 1] by each image's 0.5 / 99.5 percentiles. Training resumes from
``--checkpoint`` when that file exists.

``xjax bingo predict WEIGHTS IMAGE... --modalities NAME... -o OUTDIR`` registers the images (any
number, any mix of the trained modalities) in chunks of ``--chunk``, on the grid of the first
image, and writes per image the warped image and the displacement (world mm, pull, NIfTI vector
image) with ``transforms.json`` (readable by ``xjax apply``), the common structure (mean of
``q(z^L | x, v)``, channels as volumes) and ``report.json``.

JAX, Flax, the network modules and the core of xjax are imported when a command runs, not when
the parser is built.
"""

from __future__ import annotations

import json
import os
import time

__all__ = ["add_parser", "run", "load_manifest", "train_files", "predict_files"]


def load_manifest(path):
    """``(GroupData, modalities, grid)`` from a manifest (see the module docstring)."""
    import numpy as np

    from xjax.io import load_image
    from xjax.resample import to_common_space
    from xjax.intensity import unit_range as normalise
    from xjax.nn.bingo.train import GroupData

    path = os.fspath(path)
    try:
        with open(path) as f:
            manifest = json.load(f)
        modalities, groups = list(manifest["modalities"]), manifest["groups"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a manifest with 'modalities' and 'groups' ({e})") from None
    root = os.path.dirname(os.path.abspath(path))
    images, present, grid = [], [], None
    for g, group in enumerate(groups):
        files = group.get("images") if isinstance(group, dict) else None
        if not isinstance(files, list) or len(files) != len(modalities):
            raise ValueError(f"{path}: group {g} needs 'images', a list of {len(modalities)} paths "
                             f"or nulls, got {files!r}")
        have = [f is not None for f in files]
        if not any(have):
            raise ValueError(f"{path}: group {g} has no image")
        loaded = [load_image(os.path.join(root, f)) for f in files if f is not None]
        arrays, common = to_common_space([a for a, _ in loaded], [gr for _, gr in loaded])
        if grid is None:
            grid = common
        elif common.shape != grid.shape:
            raise ValueError(f"{path}: group {g} lies on a grid of shape {common.shape}, group 0 on "
                             f"{grid.shape}; all groups need one shape")
        full = np.zeros((len(modalities),) + common.shape, np.float32)
        full[np.flatnonzero(have)] = normalise(arrays)
        images.append(full)
        present.append(have)
    if grid is None:
        raise ValueError(f"{path}: no groups")
    return GroupData(np.stack(images), np.array(present, bool)), modalities, grid


def _elbo_weights(weights, smoothness):
    from xjax.nn.bingo.losses import ElboWeights

    default = ElboWeights()
    lambdas = (default.reconstruction, default.velocity, default.structure) if weights is None else weights
    return ElboWeights(*lambdas, smoothness=default.smoothness if smoothness is None else smoothness)


def train_files(manifest, output, *, scheme="complete", steps=1000, batch=4, features=(8, 16, 32),
                latent=4, lr=1e-3, weights=None, smoothness=None, checkpoint=None,
                log=None, seed=0, fast_compile=False, force=False, quiet=False) -> dict:
    """Train on a manifest and write the weights (``bingo_train.save_model``); returns a summary.

    ``weights`` (``lambda_1..3``) and ``smoothness`` default to those of
    :class:`~xjax.nn.bingo.losses.ElboWeights`."""
    from xjax.io import check_output_path
    from xjax.nn import bingo
    from xjax.nn.bingo import train as bingo_train
    from xjax.progress import ProgressBar, null

    check_output_path(output, force, kind="file", inputs=[manifest, checkpoint, log])
    data, modalities, grid = load_manifest(manifest)
    config = bingo.BingoConfig(ndim=grid.ndim, num_modalities=len(modalities),
                               features=tuple(features), latent=latent,
                               decoder_features=tuple(features))
    train = bingo_train.TrainConfig(
        steps=steps, learning_rate=lr, batch_size=batch, scheme=scheme, seed=seed,
        weights=_elbo_weights(weights, smoothness), log_every=10,
        checkpoint_every=100 if checkpoint else 0)
    model = bingo.create(config, seed)
    start = time.perf_counter()
    bar = null if quiet else ProgressBar("bingo train")
    history = bingo_train.train(model, data, grid, train, checkpoint_path=checkpoint, log_path=log,
                                progress=bar, fast_compile=fast_compile)
    if not quiet:
        bar.close()
    bingo_train.save_model(output, model, extra={
        "modalities": modalities, "train": train.to_dict(),
        "grid": {"shape": list(grid.shape), "spacing_mm": [float(s) for s in grid.spacing]}})
    return {"groups": int(data.images.shape[0]), "steps": steps,
            "final": history[-1] if history else None, "seconds": time.perf_counter() - start}


def predict_files(weights, images, modalities, outdir, *, chunk=64, force=False) -> dict:
    """Register ``images`` (NIfTI paths) with the model in ``weights``; write into ``outdir``."""
    import numpy as np

    from xjax.io import (atomic_output_dir, check_output_path, grid_dict, load_image, save_image, write_json,
                         write_transforms)
    from xjax.resample import to_common_space
    from xjax.nn import bingo
    from xjax.intensity import unit_range as normalise
    from xjax.nn.bingo.train import load_model

    check_output_path(outdir, force, kind="directory", inputs=[weights, *images])
    model, stored = load_model(weights)
    names = stored.get("modalities") or [str(k) for k in range(model.config.num_modalities)]
    if len(modalities) != len(images):
        raise ValueError(f"--modalities needs one name per image: {len(images)} images, "
                         f"{len(modalities)} names")
    unknown = sorted(set(modalities) - set(names))
    if unknown:
        raise ValueError(f"modalities {unknown} are not among the trained ones {names}")
    loaded = [load_image(p) for p in images]
    arrays, grid = to_common_space([a for a, _ in loaded], [g for _, g in loaded])
    if grid.ndim != model.config.ndim:
        raise ValueError(f"the model is {model.config.ndim}D but the images are {grid.ndim}D")
    index = np.array([names.index(m) for m in modalities], np.int32)
    start = time.perf_counter()
    reg = bingo.register_group(model, normalise(arrays), index, grid, chunk=chunk)
    displacement = np.asarray(reg.displacement)
    seconds = time.perf_counter() - start
    with atomic_output_dir(outdir, force) as tmp:
        write_transforms(tmp, images, loaded, grid, displacement)
        common = np.asarray(reg.common[-1])
        if common.shape[:-1] == grid.shape:
            save_image(os.path.join(tmp, "common_structure.nii.gz"), common, grid)
        report = {"inputs": [os.path.abspath(p) for p in images], "modalities": list(modalities),
                  "weights": os.path.abspath(weights), "chunk": chunk,
                  "grid": grid_dict(grid),
                  "register_seconds": seconds}
        write_json(os.path.join(tmp, "report.json"), report)
    return report


def add_parser(commands) -> None:
    """Add the ``bingo`` command (``train`` and ``predict``) to the ``xjax`` sub-parsers."""
    parser = commands.add_parser(
        "bingo", help="BInGo: train the hierarchical VAE, or register groups of any size with it",
        description="BInGo (hierarchical Bayesian groupwise registration): a variational "
                    "auto-encoder that disentangles common structure, deformations and appearance.")
    actions = parser.add_subparsers(dest="bingo_command", required=True, metavar="ACTION")
    train = actions.add_parser("train", help="train on NIfTI groups listed in a JSON manifest",
                               description=__doc__.split("\n\n")[1])
    train.add_argument("manifest", metavar="MANIFEST", help="JSON manifest of the training groups")
    train.add_argument("-o", "--output", required=True, metavar="WEIGHTS", help="weights file (.npz)")
    train.add_argument("--scheme", default="complete", choices=("complete", "partial"),
                       help="whole groups, or pairs of modalities (missing modalities allowed)")
    train.add_argument("--steps", type=int, default=1000)
    train.add_argument("--batch", type=int, default=4, help="groups per step")
    train.add_argument("--features", type=int, nargs="+", default=[8, 16, 32],
                       help="encoder widths per level, finest first (the number of levels)")
    train.add_argument("--latent", type=int, default=4, help="channels of z per level")
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--weights", type=float, nargs=3, default=None, metavar=("L1", "L2", "L3"),
                       help="ELBO weights: reconstruction, velocity KL, structure KL "
                            "(default: xjax.nn.bingo.losses.ElboWeights, 20 2 1)")
    train.add_argument("--smoothness", type=float, default=None,
                       help="velocity prior precision (default 10)")
    train.add_argument("--checkpoint", metavar="PATH", help="training checkpoint: resumed if present")
    train.add_argument("--log", metavar="PATH", help="JSON-lines metrics log (appended)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--fast-compile", action="store_true",
                       help="compile the training step faster but run it slower (short runs)")
    train.add_argument("--force", action="store_true", help="replace WEIGHTS if it exists")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    predict = actions.add_parser("predict", help="register a group of any size with trained weights")
    predict.add_argument("weights", metavar="WEIGHTS", help="weights written by 'xjax bingo train'")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="NIfTI images of the group")
    predict.add_argument("--modalities", nargs="+", required=True, metavar="NAME",
                         help="the modality of each image (names stored in WEIGHTS)")
    predict.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    predict.add_argument("--chunk", type=int, default=64, help="images per chunk")
    predict.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    parser.set_defaults(run=run)


def run(args) -> int:
    """Dispatch ``xjax bingo train|predict``; returns the exit status."""
    if args.bingo_command == "train":
        summary = train_files(args.manifest, args.output, scheme=args.scheme, steps=args.steps,
                              batch=args.batch, features=args.features, latent=args.latent,
                              lr=args.lr, weights=args.weights, smoothness=args.smoothness,
                              checkpoint=args.checkpoint, log=args.log, seed=args.seed,
                              fast_compile=args.fast_compile, force=args.force, quiet=args.quiet)
        if not args.quiet:
            print(f"trained on {summary['groups']} groups for {summary['steps']} steps "
                  f"({summary['seconds']:.0f} s): {args.output}")
        return 0
    report = predict_files(args.weights, args.images, args.modalities, args.output,
                           chunk=args.chunk, force=args.force)
    print(f"registered {len(report['inputs'])} images into {args.output} "
          f"({report['register_seconds']:.1f} s)")
    return 0
