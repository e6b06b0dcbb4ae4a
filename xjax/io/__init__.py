"""Files of images: the only package of xjax that touches them (and the only ``nibabel`` import).

* :mod:`xjax.io.nifti`: reading and writing NIfTI images, label maps and displacement fields, each
  with the :class:`~xjax.grid.Grid` of its affine;
* :mod:`xjax.io.outputs`: atomic output files and directories, JSON reports and a group's
  transforms (warped images, displacement fields, ``transforms.json``).

Every file is written atomically (a temporary file in the same directory, then ``os.replace``), and
whole output directories through :func:`atomic_output_dir` (several files through
:func:`atomic_output_files`), so a failed run leaves nothing half-written. Resampling between
grids is numerical, not I/O: it lives in :mod:`xjax.resample`.
"""

from xjax.io.nifti import load_displacement as load_displacement
from xjax.io.nifti import load_image as load_image
from xjax.io.nifti import load_labels as load_labels
from xjax.io.nifti import save_image as save_image
from xjax.io.outputs import TRANSFORMS_JSON as TRANSFORMS_JSON
from xjax.io.outputs import atomic_output_dir as atomic_output_dir
from xjax.io.outputs import atomic_output_files as atomic_output_files
from xjax.io.outputs import check_output_path as check_output_path
from xjax.io.outputs import file_stem as file_stem
from xjax.io.outputs import grid_dict as grid_dict
from xjax.io.outputs import write_json as write_json
from xjax.io.outputs import write_transforms as write_transforms

__all__ = [
    "TRANSFORMS_JSON",
    "atomic_output_dir",
    "atomic_output_files",
    "check_output_path",
    "file_stem",
    "grid_dict",
    "load_displacement",
    "load_image",
    "load_labels",
    "save_image",
    "write_json",
    "write_transforms",
]
