"""Checkpoints of training state: any pytree of arrays plus a JSON config, in one ``.npz`` file.

A checkpoint holds whatever pytree the caller passes (for training: model parameters, optimiser
states, step counter and PRNG key, e.g. one NamedTuple) and a JSON-serialisable ``config`` dict
(what is needed to rebuild the model and the data pipeline before restoring). Leaves are stored
under their pytree path (``jax.tree_util.keystr``) with their exact dtype and bytes, so a restored
state is bit-identical and training resumes exactly where it stopped. Typed PRNG keys
(``jax.random.key``) are stored as their key data and re-wrapped with their implementation.

Why ``numpy.savez`` rather than orbax: a checkpoint here is small (at most tens of MB), written
synchronously from one host; one self-describing file readable with numpy alone is simpler to
commit (trained weights ship with the package), to copy and to inspect than orbax's directory of
per-array files and metadata, and an atomic write is a plain write-then-rename.

Writes are atomic: the file is written to a temporary name in the destination folder, flushed to
disk and renamed over the destination, so a crash never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["save", "restore", "read_config", "network_of", "FORMAT"]

#: Format tag stored in every checkpoint; :func:`restore` refuses other formats.
FORMAT = "xjax-checkpoint-1"
_META = "__meta__"
_KEY_PREFIX = "__key__:"


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _entries(tree) -> dict[str, Any]:
    """``{path: leaf}`` of a pytree, in flattening order."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def save(path, tree, *, config: dict | None = None) -> None:
    """Write ``tree`` and ``config`` to ``path`` (a ``.npz`` file), atomically.

    Args:
      path: destination file; its folder is created if needed. An existing file is replaced.
      tree: pytree whose leaves are arrays (jax or numpy, including typed PRNG keys) or Python
        scalars.
      config: JSON-serialisable dict stored beside the arrays (default ``{}``).
    """
    path = Path(path)
    arrays, keys = {}, {}
    for name, leaf in _entries(tree).items():
        if _is_key(leaf):
            keys[name] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        arrays[name] = np.asarray(jax.device_get(leaf))
    try:
        meta = json.dumps({"format": FORMAT, "config": {} if config is None else config, "keys": keys})
    except TypeError as e:
        raise ValueError(f"config must be JSON-serialisable, got {config!r}: {e}") from None
    arrays[_META] = np.frombuffer(meta.encode("utf-8"), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


#: what numpy raises on a truncated or corrupt ``.npz`` (when opening it or reading an entry).
_UNREADABLE = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, UnicodeDecodeError)


def _unreadable(path, error: Exception) -> ValueError:
    """The error for a file that is not a readable checkpoint, naming it and numpy's reason."""
    return ValueError(f"{path}: not a readable xjax weights file (truncated or corrupt? {error})")


def _entry(data, name: str, path) -> np.ndarray:
    """Entry ``name`` of the open archive ``data``; a corrupt entry raises :func:`_unreadable`."""
    try:
        return data[name]
    except _UNREADABLE as e:
        raise _unreadable(path, e) from None


def _load(path, *, arrays: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Read the checkpoint ``path``: ``({entry name: array}, metadata)``, the arrays left out
    (``{}``) unless ``arrays``. The file is closed on return. ValueError names the file when it is
    missing, truncated or corrupt, or not an xjax checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    with open(path, "rb") as file:  # numpy leaves the file open when the archive is bad
        try:
            data = np.load(file, allow_pickle=False)
        except _UNREADABLE as e:
            raise _unreadable(path, e) from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise _unreadable(path, "a single .npy array, not an .npz archive")
        with data:
            if _META not in data.files:
                raise ValueError(f"{str(path)!r} is not an xjax checkpoint (no metadata)")
            try:
                meta = json.loads(_entry(data, _META, path).tobytes().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _unreadable(path, e) from None
            stored = meta.get("format") if isinstance(meta, dict) else None
            if stored != FORMAT:
                raise ValueError(f"checkpoint {str(path)!r} has format {stored!r}, expected {FORMAT!r}")
            entries = {name: _entry(data, name, path) for name in data.files
                       if name != _META} if arrays else {}
    return entries, meta


def read_config(path) -> dict:
    """The ``config`` dict stored in the checkpoint at ``path``."""
    return _load(path, arrays=False)[1]["config"]


def network_of(config: dict) -> str | None:
    """Which network a stored ``config`` (of weights or a training checkpoint) belongs to:
    ``"DCC"`` or ``"BInGo"`` when the fields of its ``"model"`` entry are fields of
    :class:`~xjax.nn.dcc.DCCConfig` or :class:`~xjax.nn.bingo.BingoConfig` (older files may
    lack fields added since), one at least of that config alone; else None."""
    from xjax.nn.bingo.model import BingoConfig
    from xjax.nn.dcc.model import DCCConfig

    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        return None
    fields = {name: {f.name for f in dataclasses.fields(cls)}
              for name, cls in (("DCC", DCCConfig), ("BInGo", BingoConfig))}
    for name, own in fields.items():
        others = set().union(*(f for n, f in fields.items() if n != name))
        if set(model) <= own and set(model) - others:
            return name
    return None


def restore(path, like) -> tuple[Any, dict]:
    """Read a checkpoint written by :func:`save`.

    Args:
      path: the ``.npz`` file.
      like: a pytree with the structure, shapes and dtypes to restore into (e.g. a freshly
        initialised training state built from the stored config); its values are ignored.

    Returns:
      ``(tree, config)``: ``tree`` has ``like``'s structure with the stored values (jax arrays;
      typed PRNG keys re-wrapped), ``config`` the stored dict.

    Raises:
      ValueError: naming the missing, extra or mismatched entries when the checkpoint does not
        fit ``like``; naming the file when it is truncated or corrupt.
    """
    data, meta = _load(path)
    template = _entries(like)
    stored = set(data)
    missing, extra = sorted(set(template) - stored), sorted(stored - set(template))
    if missing or extra:
        raise ValueError(f"checkpoint {str(path)!r} does not match the expected state: "
                         f"missing {missing}, unexpected {extra}")
    leaves = []
    for name, ref in template.items():
        value = data[name]
        if _is_key(ref):
            ref_data = jax.random.key_data(ref)
            if value.shape != ref_data.shape or value.dtype != ref_data.dtype:
                raise ValueError(f"checkpoint entry {name} holds key data {value.shape} {value.dtype}, "
                                 f"expected {ref_data.shape} {ref_data.dtype}")
            leaves.append(jax.random.wrap_key_data(value, impl=jax.random.key_impl(ref)))
            continue
        ref_arr = np.asarray(ref)
        if value.shape != ref_arr.shape or value.dtype != ref_arr.dtype:
            raise ValueError(f"checkpoint entry {name} is {value.shape} {value.dtype}, expected "
                             f"{ref_arr.shape} {ref_arr.dtype}")
        leaves.append(jax.numpy.asarray(value))
    treedef = jax.tree_util.tree_structure(like)
    return jax.tree_util.tree_unflatten(treedef, leaves), meta["config"]
