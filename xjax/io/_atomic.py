"""Atomic writing of single files (private): a fresh hidden sibling, then ``os.replace``.

Below both :mod:`xjax.io.nifti` (which saves images through it) and :mod:`xjax.io.outputs` (which
writes whole directories and the transforms of a group through :mod:`xjax.io.nifti`), so that
neither imports the other in a cycle.
"""

from __future__ import annotations

import contextlib
import os
import secrets

import nibabel as nib

__all__ = ["_sibling", "_suffix", "_atomic_save"]


def _sibling(path: str, tag: str, suffix: str = "") -> str:
    """A fresh hidden name next to ``path`` (created by the caller, so the umask applies)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _suffix(path: str) -> str:
    """The extension that tells nibabel how to write ``path``: ``.nii.gz``, else the last one."""
    return ".nii.gz" if path.endswith(".nii.gz") else os.path.splitext(path)[1]


def _atomic_save(img, path: str) -> None:
    """``nib.save(img, path)`` through a temporary sibling, so ``path`` appears whole or not at all."""
    tmp = _sibling(path, "tmp", _suffix(path))
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
