"""The ``xjax dcc`` command: train the DCC network on NIfTI groups, and predict with it.

``xjax dcc train MANIFEST -o WEIGHTS.npz`` reads a JSON manifest::

    {"modalities": ["bSSFP", "LGE", "T2"],
     "groups": [{"images": ["a_C0.nii.gz", "a_DE.nii.gz", "a_T2.nii.gz"],
                 "labels": ["a_C0_gt.nii.gz", null, null]}, ...]}

(paths relative to the manifest; ``labels`` optional, ``null`` for an unlabelled image). Image
``j`` of every group has modality ``j``. Each group is resampled onto the grid of its first image
(:func:`xjax.resample.to_common_space`; labels by nearest neighbour), and all groups must then share one
shape. Training resumes from ``--checkpoint`` when that file exists.

``xjax dcc predict WEIGHTS IMAGE... -o OUTDIR`` writes what ``xjax register`` writes: per image the
warped image and the displacement (world mm, pull, on the common grid = the first image's grid),
the posterior ``Z[2]`` (Eq. 40) and its argmax segmentation, the network's probability maps,
``transforms.json`` (readable by ``xjax apply``) and ``report.json``.

JAX, Flax, the network modules and the core of xjax are imported when a command runs, not when
the parser is built.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from xjax.cli.common import environment

__all__ = ["add_parser", "run", "load_manifest", "train_files", "predict_files"]

#: :data:`xjax.nn.dcc.train.STRATEGIES`, repeated so that building the parser imports no Flax.
STRATEGIES = ("DGR", "DCC+AT", "DCC+BS", "DCC+All")


def load_manifest(path):
    """``(images (P, N, *S) float32, labels (P, N, *S) int32 or None, modalities, grids)`` from a
    manifest (see the module docstring)."""
    import numpy as np

    from xjax.io import load_image
    from xjax.resample import pull_image, to_common_space

    path = os.path.abspath(path)
    try:
        with open(path) as f:
            manifest = json.load(f)
        groups = manifest["groups"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable DCC manifest ({e})") from None
    if not isinstance(groups, list) or not groups:
        raise ValueError(f"{path}: 'groups' must be a non-empty list")
    base = os.path.dirname(path)
    sizes = {len(g.get("images", [])) for g in groups}
    if len(sizes) != 1 or min(sizes) < 2:
        raise ValueError(f"{path}: every group needs the same number (>= 2) of images, got {sorted(sizes)}")
    n = sizes.pop()
    modalities = manifest.get("modalities") or [f"modality_{j}" for j in range(n)]
    if len(modalities) != n:
        raise ValueError(f"{path}: {len(modalities)} modalities for groups of {n} images")
    images, labels, grids, any_labels = [], [], [], any(g.get("labels") for g in groups)
    for i, g in enumerate(groups):
        files = [os.path.join(base, p) for p in g["images"]]
        loaded = [load_image(p) for p in files]
        group, common = to_common_space([a for a, _ in loaded], [gr for _, gr in loaded], 0, names=files)
        if grids and common.shape != grids[0].shape:
            raise ValueError(f"{path}: group {i} has shape {common.shape}, group 0 has {grids[0].shape}; "
                             "all groups must share one shape")
        grids.append(common)
        images.append(group)
        lab = np.zeros(group.shape, np.int32)
        for j, p in enumerate(g.get("labels") or [None] * n):
            if p is not None:
                data, grid = load_image(os.path.join(base, p))
                lab[j] = np.rint(pull_image(data, grid, common, order=0)).astype(np.int32)
        labels.append(lab)
    return (np.stack(images).astype(np.float32), np.stack(labels) if any_labels else None, list(modalities), grids)


def train_files(manifest, output, *, strategy="DGR", labelled_modality=0, num_classes=4, steps=1000,
                batch_size=8, width=16, levels=4, bins=32, bending=100.0, seg_lr=1e-3, reg_lr=1e-4,
                alternate_every=5, checkpoint=None, log=None, seed=0, fast_compile=False, force=False,
                quiet=False) -> dict:
    """Train on a manifest and write the weights to ``output`` (see the module docstring)."""
    from xjax.io import check_output_path
    from xjax.nn import dcc
    from xjax.nn.dcc import losses as dcc_losses
    from xjax.nn.dcc import train as dcc_train
    from xjax.progress import ProgressBar

    check_output_path(output, force, kind="file", inputs=[manifest, checkpoint, log])
    config = dcc_train.TrainConfig(strategy=strategy, labelled_modality=labelled_modality, batch_size=batch_size,
                                   seg_lr=seg_lr, reg_lr=reg_lr, alternate_every=alternate_every, seed=seed)
    loss_config = dcc_losses.LossConfig(num_classes=num_classes, bins=bins, bending_weight=bending)
    images, labels, modalities, grids = load_manifest(manifest)
    model_config = dcc.DCCConfig(ndim=images.ndim - 2, num_classes=num_classes, num_modalities=len(modalities),
                                 width=width, levels=levels, flow_scales=min(4, levels))
    data = dcc_train.make_dataset(images, labels, list(range(len(modalities))), num_classes, config)
    model = dcc.create(model_config, seed=seed)
    t0 = time.perf_counter()
    bar = None if quiet else ProgressBar(f"training DCC ({strategy})")
    try:
        model, state = dcc_train.train(model, data, loss_config, config, steps, checkpoint_path=checkpoint,
                                       log_path=log, progress=bar, fast_compile=fast_compile)
    finally:
        if bar is not None:
            bar.close()
    info = {"strategy": strategy, "labelled": config.labelled(len(modalities)).tolist(), "modalities": modalities,
            "loss": {"bins": bins, "num_classes": num_classes}, "train_steps": int(state.step),
            "train": config.to_dict(), "seconds": time.perf_counter() - t0}
    dcc_train.save_weights(output, model, data.prior, info)
    return info


def predict_files(weights, paths, outdir, *, force=False, quiet=False) -> dict:
    """Register and segment one group of NIfTI images with trained weights; write ``outdir``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from xjax.io import (atomic_output_dir, check_output_path, file_stem, grid_dict, load_image, save_image,
                         write_json, write_transforms)
    from xjax.resample import to_common_space
    from xjax.nn import dcc
    from xjax.nn.dcc import train as dcc_train

    paths = [os.path.abspath(p) for p in paths]
    check_output_path(outdir, force, kind="directory", inputs=[weights, *paths])
    model, prior, info = dcc_train.load_weights(weights)
    n = len(info["modalities"])
    if len(paths) != n:
        raise ValueError(f"the weights {weights} expect {n} images ({', '.join(info['modalities'])}), got {len(paths)}")
    t0 = time.perf_counter()
    loaded = [load_image(p) for p in paths]
    group, common = to_common_space([a for a, _ in loaded], [g for _, g in loaded], 0, names=paths)
    if common.ndim != model.config.ndim:
        raise ValueError(f"the weights are for {model.config.ndim}D images, got {common.ndim}D")
    if info["strategy"] == "DCC+AT" and tuple(prior.shape[:-1]) != common.shape:
        raise ValueError(f"the DCC+AT atlas is {tuple(prior.shape[:-1])}, the images {common.shape}")
    num_classes = info["loss"]["num_classes"]
    graphdef, state = nnx.split(model)
    predict = dcc_train.make_predictor(graphdef, num_classes=num_classes, bins=info["loss"]["bins"], zeta=0.01)
    uniform = jnp.full(common.shape + (num_classes,), 1.0 / num_classes, jnp.float32)
    pred = jax.block_until_ready(predict(state, dcc.normalise(group), jnp.arange(n), jnp.asarray(info["labelled"]),
                                         prior if info["strategy"] == "DCC+AT" else uniform))
    t1 = time.perf_counter()
    disp = dcc.displacement_to_mm(pred.displacement, common)
    report = {"weights": os.path.abspath(weights), "strategy": info["strategy"], "modalities": info["modalities"],
              "inputs": [{"path": p, "grid": grid_dict(g)} for p, (_, g) in zip(paths, loaded)],
              "common_grid": grid_dict(common),
              "pi_posterior": [float(v) for v in np.asarray(pred.posterior).reshape(-1, num_classes).mean(0)],
              **environment()}
    with atomic_output_dir(outdir, force) as tmp:
        entries = write_transforms(tmp, paths, loaded, common, disp)
        for j, e in enumerate(entries):
            e["probabilities"] = f"probabilities_{j}_{file_stem(e['input'])}.nii.gz"
            save_image(os.path.join(tmp, e["probabilities"]), np.asarray(pred.probs[j], np.float32), common)
        save_image(os.path.join(tmp, "posterior.nii.gz"), np.asarray(pred.posterior, np.float32), common)
        save_image(os.path.join(tmp, "segmentation.nii.gz"), np.asarray(pred.segmentation), common, dtype=np.int16)
        report["outputs"] = entries
        report["timings_s"] = {"load_and_predict": t1 - t0, "write": time.perf_counter() - t1}
        write_json(os.path.join(tmp, "report.json"), report)
    if not quiet:
        print(f"registered and segmented {n} images into {outdir} ({t1 - t0:.1f} s)")
    return report


def add_parser(commands) -> None:
    """Add the ``dcc`` command (``train`` and ``predict``) to the ``xjax`` sub-parsers."""
    parser = commands.add_parser(
        "dcc", help="deep combined computing: train the DCC network, or register and segment with it",
        description="Deep combined computing (X-metric paper, Sec. 3.5): one network registers a group of "
                    "multimodal images and segments it.")
    actions = parser.add_subparsers(dest="dcc_command", required=True, metavar="ACTION")
    train = actions.add_parser("train", help="train on NIfTI groups listed in a JSON manifest",
                               description=__doc__.split("\n\n")[1])
    train.add_argument("manifest", metavar="MANIFEST", help="JSON manifest of the training groups")
    train.add_argument("-o", "--output", required=True, metavar="WEIGHTS", help="weights file to write (.npz)")
    train.add_argument("--strategy", default="DGR", choices=STRATEGIES)
    train.add_argument("--labelled", type=int, default=0, metavar="J",
                       help="image index whose labels DCC+BS observes (and DCC+AT votes its atlas from)")
    train.add_argument("--classes", type=int, default=4, metavar="K")
    train.add_argument("--steps", type=int, default=1000, help="total training steps")
    train.add_argument("--batch", type=int, default=8, help="groups per step")
    train.add_argument("--width", type=int, default=16, help="channels of the first level (C)")
    train.add_argument("--levels", type=int, default=4, help="encoder levels (L_R)")
    train.add_argument("--bins", type=int, default=32, metavar="L")
    train.add_argument("--bending", type=float, default=100.0, metavar="LAMBDA")
    train.add_argument("--seg-lr", type=float, default=1e-3, help="Adam step of the segmentation branch")
    train.add_argument("--reg-lr", type=float, default=1e-4, help="Adam step of the registration branch")
    train.add_argument("--alternate", type=int, default=5, metavar="STEPS",
                       help="steps per branch before switching to the other")
    train.add_argument("--checkpoint", metavar="PATH", help="training checkpoint: resumed if it exists")
    train.add_argument("--log", metavar="PATH", help="JSON-lines metrics log (appended)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--fast-compile", action="store_true",
                       help="compile the training step about 3x faster but run it slower (short runs)")
    train.add_argument("--force", action="store_true", help="replace WEIGHTS if it exists")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    predict = actions.add_parser("predict", help="register and segment one group with trained weights")
    predict.add_argument("weights", metavar="WEIGHTS", help="weights file written by 'xjax dcc train'")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="the group, one image per modality, in order")
    predict.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    predict.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    predict.add_argument("--quiet", action="store_true")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``xjax dcc`` command; returns the exit status."""
    if args.dcc_command == "train":
        info = train_files(args.manifest, args.output, strategy=args.strategy, labelled_modality=args.labelled,
                           num_classes=args.classes, steps=args.steps, batch_size=args.batch, width=args.width,
                           levels=args.levels, bins=args.bins, bending=args.bending, seg_lr=args.seg_lr,
                           reg_lr=args.reg_lr, alternate_every=args.alternate, checkpoint=args.checkpoint,
                           log=args.log, seed=args.seed, fast_compile=args.fast_compile, force=args.force,
                           quiet=args.quiet)
        if not args.quiet:
            print(f"trained {info['train_steps']} steps ({info['seconds']:.0f} s); weights in {args.output}")
        return 0
    predict_files(args.weights, args.images, args.output, force=args.force, quiet=args.quiet)
    return 0
