"""The coordinate convention of xjax, written once.

* **Arrays** of one image are indexed ``(x, y)`` in 2D and ``(x, y, z)`` in 3D: axis ``a`` of the
  array is voxel index ``i_a`` of the NIfTI file, exactly as ``nibabel``'s ``get_fdata()`` returns it.
  A group of ``N`` images on one grid is an array ``(N, *spatial)``.
* **World** coordinates are millimetres in the NIfTI (RAS+) frame. A :class:`Grid` owns the
  ``(D+1, D+1)`` affine ``world = A @ [index, 1]``; 2D grids carry a 3x3 affine (the in-plane part
  of the NIfTI 4x4).
* **Vector fields** (displacements, velocities) are channels-last, ``(*spatial, D)``, in world mm.
* **Transforms pull**: a transform ``phi_j`` maps a point ``x`` of the common space (world mm) to
  the point ``phi_j(x) = x + u_j(x)`` of image ``j``'s world space, and the warped image is
  ``(U_j o phi_j)(x) = U_j(phi_j(x))``, sampled by interpolation. A displacement field stored on a
  grid holds ``u_j(x)`` at that grid's voxel centres.

Everything that converts between indices and millimetres goes through :class:`Grid`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

__all__ = ["Grid", "bounding_grid", "slice_frame", "apply_affine", "apply_linear"]


def _as_tuple_matrix(a: np.ndarray) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in row) for row in np.asarray(a, dtype=np.float64))


def apply_linear(points, matrix):
    """``matrix @ p`` for every point ``p``: points ``(..., D)``, matrix ``(D, D)``.

    Written as ``D`` multiply-adds rather than a matmul: exact float32 on every backend (a GPU
    matmul defaults to TF32, which would cost hundredths of a millimetre on coordinates of a few
    hundred mm) and several times faster than a dot product with inner size ``D``.
    """
    return sum(points[..., j, None] * matrix[:, j] for j in range(points.shape[-1]))


def apply_affine(matrix: np.ndarray, points):
    """Apply a ``(D+1, D+1)`` numpy affine to points ``(..., D)`` (see :func:`apply_linear`)."""
    d = matrix.shape[0] - 1
    dtype = jnp.result_type(points, jnp.float32)
    return apply_linear(points, jnp.asarray(matrix[:d, :d], dtype)) + jnp.asarray(matrix[:d, d], dtype)


@dataclasses.dataclass(frozen=True)
class Grid:
    """A regular sampling grid: static shape plus an index -> world affine.

    Hashable and static under ``jax.jit`` (it holds Python numbers only).

    **2D slices of 3D space.** A 2D grid read from a NIfTI file (:meth:`from_slice`) keeps the
    file's 4x4 affine as ``slab``: where the slice lies in the scanner's 3D space and how thick it
    is. Its 2D ``affine`` then maps indices to coordinates in the slice's own plane, along two
    orthonormal in-plane axes (:func:`slice_frame`: for an axial slice the world x and y, so the 2D
    coordinates are the RAS x and y in mm; for an oblique slice the projections of the first two
    world axes that lie well within the plane), so that in-plane distances, spacings and angles are
    the true ones in mm. :meth:`to_nifti_affine` gives the slab back, so outputs overlay the
    inputs in a viewer.

    Attributes:
      shape: number of voxels along each index axis, ``(X, Y)`` or ``(X, Y, Z)``.
      affine: ``(D+1, D+1)`` nested tuple, ``world_mm = affine @ [index, 1]``.
      slab: ``None``, or for a 2D grid the 4x4 NIfTI affine of the slice it is (see above).
    """

    shape: tuple[int, ...]
    affine: tuple[tuple[float, ...], ...]
    slab: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        object.__setattr__(self, "shape", shape)
        a = np.asarray(self.affine, dtype=np.float64)
        d = len(shape)
        if d not in (2, 3):
            raise ValueError(f"Grid must be 2D or 3D, got shape {shape}")
        if any(s < 1 for s in shape):
            raise ValueError(f"Grid shape must be positive, got {shape}")
        if a.shape != (d + 1, d + 1):
            raise ValueError(f"a {d}D grid needs a {(d + 1, d + 1)} affine, got {a.shape}")
        if not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:d, :d])) < 1e-12:
            raise ValueError(f"Grid affine must be finite and invertible, got\n{a}")
        object.__setattr__(self, "affine", _as_tuple_matrix(a))
        if self.slab is not None:
            slab = np.asarray(self.slab, dtype=np.float64)
            if d != 2 or slab.shape != (4, 4) or not np.all(np.isfinite(slab)):
                raise ValueError(f"a slab is the finite 4x4 affine of a 2D grid, got {slab.shape} "
                                 f"for a {d}D grid")
            object.__setattr__(self, "slab", _as_tuple_matrix(slab))

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def regular(cls, shape: Sequence[int], spacing: float | Sequence[float] = 1.0,
                origin: Sequence[float] | None = None) -> "Grid":
        """Axis-aligned grid; ``origin`` is the world position of voxel 0 (default: centred at 0)."""
        shape = tuple(int(s) for s in shape)
        d = len(shape)
        sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (d,))
        if origin is None:
            origin = -0.5 * (np.asarray(shape) - 1) * sp
        a = np.eye(d + 1)
        a[:d, :d] = np.diag(sp)
        a[:d, d] = np.asarray(origin, dtype=np.float64)
        return cls(shape, _as_tuple_matrix(a))

    # ---- geometry -------------------------------------------------------------------------
    @classmethod
    def from_slice(cls, shape: Sequence[int], nifti_affine: np.ndarray) -> "Grid":
        """The 2D grid of a one-slice NIfTI image ``(X, Y, 1)`` with 4x4 affine ``nifti_affine``:
        in-plane coordinates along :func:`slice_frame`, and the 4x4 kept as ``slab``."""
        slab = np.asarray(nifti_affine, np.float64)
        return cls(tuple(shape), _in_plane(slice_frame(slab), slab), slab=slab)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def matrix(self) -> np.ndarray:
        """The affine as a float64 numpy array, ``(D+1, D+1)``."""
        return np.asarray(self.affine, dtype=np.float64)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each index axis, ``(D,)``."""
        return np.linalg.norm(self.matrix[:-1, :-1], axis=0)

    @property
    def center(self) -> np.ndarray:
        """World position (mm) of the grid's centre, ``(D,)``."""
        return self.index_to_world_np((np.asarray(self.shape) - 1) / 2.0)

    def corners(self) -> np.ndarray:
        """World positions of the ``2**D`` corner voxel centres, ``(2**D, D)``."""
        idx = np.stack(np.meshgrid(*[[0, s - 1] for s in self.shape], indexing="ij"), -1)
        return self.index_to_world_np(idx.reshape(-1, self.ndim).astype(np.float64))

    def index_to_world_np(self, idx: np.ndarray) -> np.ndarray:
        a = self.matrix
        return np.asarray(idx, np.float64) @ a[:-1, :-1].T + a[:-1, -1]

    def index_to_world(self, idx):
        """Voxel index ``(..., D)`` -> world mm ``(..., D)`` (jax arrays, traceable)."""
        return apply_affine(self.matrix, idx)

    def world_to_index(self, pts):
        """World mm ``(..., D)`` -> continuous voxel index ``(..., D)`` (traceable)."""
        return apply_affine(np.linalg.inv(self.matrix), pts)

    def index_points(self, dtype=jnp.float32):
        """Voxel indices of every voxel, ``(*shape, D)``."""
        axes = [jnp.arange(s, dtype=dtype) for s in self.shape]
        return jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)

    def points(self, dtype=jnp.float32):
        """World coordinates (mm) of every voxel centre, ``(*shape, D)``."""
        return self.index_to_world(self.index_points(dtype))

    def axis_coordinates(self, axis: int) -> np.ndarray:
        """Positions (mm) of the voxel centres along one index axis, measured along that axis from
        voxel 0 (``i * spacing[axis]``). Used by separable (tensor-product) evaluations."""
        return np.arange(self.shape[axis], dtype=np.float64) * self.spacing[axis]

    # ---- derived grids --------------------------------------------------------------------
    def downsample(self, factor: int = 2) -> "Grid":
        """The next coarser pyramid level: ``ceil(n / factor)`` voxels per axis, each ``factor``
        times larger, covering the same field of view (new voxel ``i`` is centred on old
        continuous index ``factor * i + (factor - 1) / 2``)."""
        if factor == 1:
            return self
        d = self.ndim
        shape = tuple(max(1, -(-s // factor)) for s in self.shape)
        scale = np.eye(d + 1)
        scale[:d, :d] *= factor
        scale[:d, d] = (factor - 1) / 2.0
        return self.in_plane_of(Grid(shape, _as_tuple_matrix(self.matrix @ scale)))

    def with_shape(self, shape: Sequence[int]) -> "Grid":
        return Grid(tuple(shape), self.affine, self.slab)

    def in_plane_of(self, other: "Grid") -> "Grid":
        """``other`` (a 2D grid in this grid's in-plane coordinates) placed in this grid's slice
        of 3D space: its slab has this slab's plane, offset and thickness. ``other`` unchanged when
        this grid has no slab."""
        if self.slab is None or other.ndim != 2:
            return other
        frame, slab, a = slice_frame(np.asarray(self.slab)), np.asarray(self.slab), other.matrix
        placed = slab.copy()
        placed[:3, :2] = frame.T @ a[:2, :2]
        normal = np.cross(frame[0], frame[1])
        placed[:3, 3] = frame.T @ a[:2, 2] + normal * (normal @ slab[:3, 3])
        return Grid(other.shape, other.affine, placed)

    def to_nifti_affine(self) -> np.ndarray:
        """The 4x4 NIfTI affine: a 2D grid's slab when it has one, else a one-slice 3D grid at
        z = 0, 1 mm thick."""
        if self.ndim == 3:
            return self.matrix
        if self.slab is not None:
            return np.asarray(self.slab, np.float64)
        a = np.eye(4)
        a[:2, :2] = self.matrix[:2, :2]
        a[:2, 3] = self.matrix[:2, 2]
        return a

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.3g}" for s in self.spacing)
        return f"Grid(shape={self.shape}, spacing=({sp}) mm)"


def bounding_grid(grids: Sequence[Grid], spacing: float | Sequence[float] | None = None) -> Grid:
    """A grid aligned with ``grids[0]``'s axes whose field of view bounds every grid of the group.

    Args:
      grids: the images' grids (same dimensionality).
      spacing: voxel size (mm) of the result; default the finest spacing of the group per axis.
    """
    if not grids:
        raise ValueError("bounding_grid needs at least one grid")
    d = grids[0].ndim
    if any(g.ndim != d for g in grids):
        raise ValueError(f"cannot bound grids of mixed dimensionality: {[g.ndim for g in grids]}")
    ref = grids[0].matrix
    direction = ref[:d, :d] / grids[0].spacing  # unit columns
    if spacing is None:
        sp = np.min(np.stack([g.spacing for g in grids]), axis=0)
    else:
        sp = np.broadcast_to(np.asarray(spacing, np.float64), (d,))
    # Field of view of each grid (voxel-edge corners) expressed along the reference directions.
    lo = np.full(d, np.inf)
    hi = np.full(d, -np.inf)
    for g in grids:
        idx = np.stack(np.meshgrid(*[[-0.5, s - 0.5] for s in g.shape], indexing="ij"), -1).reshape(-1, d)
        w = g.index_to_world_np(idx)
        c = w @ np.linalg.inv(direction).T
        lo = np.minimum(lo, c.min(0))
        hi = np.maximum(hi, c.max(0))
    shape = tuple(int(np.ceil((h - l) / s - 1e-6)) for l, h, s in zip(lo, hi, sp))
    a = np.eye(d + 1)
    a[:d, :d] = direction * sp
    a[:d, d] = direction @ (lo + 0.5 * sp)
    return grids[0].in_plane_of(Grid(shape, _as_tuple_matrix(a)))


def slice_frame(nifti_affine: np.ndarray) -> np.ndarray:
    """The in-plane axes of a slice with 4x4 affine ``nifti_affine``: ``(2, 3)``, orthonormal rows
    in world (RAS) mm. They are the world axes x, y, z, in that order, projected onto the slice's
    plane (spanned by the affine's first two columns), orthogonalised, and kept when at least half
    of their length lies in the plane: x and y for an axial slice, x and z for a coronal one, y and
    z for a sagittal one; the nearest such axes for an oblique slice."""
    a = np.asarray(nifti_affine, np.float64)
    normal = np.cross(a[:3, 0], a[:3, 1])
    size = np.linalg.norm(normal)
    if not size > 0:
        raise ValueError(f"the slice's in-plane axes are parallel:\n{a}")
    normal = normal / size
    frame = []
    for axis in np.eye(3):
        p = axis - (axis @ normal) * normal
        for f in frame:
            p = p - (p @ f) * f
        if np.linalg.norm(p) > 0.5:
            frame.append(p / np.linalg.norm(p))
        if len(frame) == 2:
            break
    return np.stack(frame)


def _in_plane(frame: np.ndarray, nifti_affine: np.ndarray) -> np.ndarray:
    """The 3x3 affine of a slice in its own plane coordinates ``frame @ world``."""
    a = np.eye(3)
    a[:2, :2] = frame @ nifti_affine[:3, :2]
    a[:2, 2] = frame @ nifti_affine[:3, 3]
    return a
