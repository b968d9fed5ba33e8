"""Rotary position embedding of the Qwen-Image MMDiT (MSRoPE), matching diffusers.

Each head's channels are rotated as interleaved pairs ``(x[2i], x[2i+1])``. The pairs are split
between three axes, ``axes_dims = (frame, height, width)`` channels (16, 56, 56 for the real
model). Image tokens (row-major) sit at ``(frame index, centred row, centred column)``; text
tokens sit on the diagonal after the largest image half-extent (FACTS 2).

Edit models place their reference images by a *method* (ComfyUI's names, set per conditioning by
its "Edit Model Reference Method" node): ``index`` / ``index_timestep_zero`` at frames 1, 2, ...,
``negative_index`` at frames -1, -2, ... (Qwen-Image-Layered), ``offset`` / ``uxo`` all at frame 1,
laid side by side by row / column offsets (``side_by_side_offsets``).

Angles are computed in float32 on the CPU, the way diffusers builds its tables, so the same
positions give bit-identical rotations on every device.
"""
from __future__ import annotations

import torch

THETA = 10000.0


def inverse_frequencies(dim: int, theta: float = THETA) -> torch.Tensor:
    """``theta ** (-2i/dim)`` for the ``dim // 2`` pairs of one axis (float32)."""
    if dim % 2:
        raise ValueError(f"a RoPE axis needs an even number of channels, got {dim}")
    return 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def centred_positions(n: int) -> torch.Tensor:
    """Positions of ``n`` rows (or columns) around zero.

    diffusers' rule: ``-(n - n//2) .. n//2 - 1``, so an odd grid has one more row below zero
    (9 -> -5..3). ComfyUI centres the other way (-4..4); we follow diffusers.
    """
    return torch.arange(-(n - n // 2), n // 2)


def image_positions(frame: int, grid_h: int, grid_w: int, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """``[grid_h * grid_w, 3]`` (frame, row, column) positions in row-major token order.

    ``offset`` (rows, columns, in patches) shifts the centred grid: references laid side by side.
    """
    rows = (centred_positions(grid_h) + offset[0])[:, None].expand(grid_h, grid_w)
    cols = (centred_positions(grid_w) + offset[1])[None, :].expand(grid_h, grid_w)
    frames = torch.full((grid_h, grid_w), frame, dtype=rows.dtype)
    return torch.stack([frames, rows, cols], dim=-1).reshape(-1, 3)


def text_start(grids: list[tuple[int, int]]) -> int:
    """First text position: the largest ``max(h//2, w//2)`` over all images in the sequence."""
    return max(max(h // 2, w // 2) for h, w in grids)


def text_positions(start: int, length: int) -> torch.Tensor:
    """``[length, 3]``: text token j sits at ``start + j`` on all three axes."""
    return (torch.arange(length) + start)[:, None].expand(length, 3)


REF_METHODS = ("index", "index_timestep_zero", "negative_index", "offset", "uxo")


def to_patches(offset: int, patch: int) -> int:
    """A latent-pixel offset in patches, rounded half up (ComfyUI's ``(off + p//2) // p``)."""
    return (offset + patch // 2) // patch


def side_by_side_offsets(sizes: list[tuple[int, int]], patch: int) -> list[tuple[int, int]]:
    """(row, column) offsets in patches of references laid out side by side (``offset`` / ``uxo``).

    ComfyUI's layout, on the references' latent sizes ``(h, w)``: each one goes below the
    images placed so far, or to their right when that keeps the bounding box squarer
    (``h + box_h > w + box_w``); the box grows to hold it. The first one sits at (0, 0).
    """
    box_h = box_w = 0
    out = []
    for h, w in sizes:
        down, right = (0, box_w) if h + box_h > w + box_w else (box_h, 0)
        box_h, box_w = max(box_h, h + down), max(box_w, w + right)
        out.append((to_patches(down, patch), to_patches(right, patch)))
    return out


def reference_placement(method: str, sizes: list[tuple[int, int]], patch: int
                        ) -> tuple[tuple[int, ...], list[tuple[int, int]] | None]:
    """RoPE frames and (row, column) offsets (None: none) of references of latent ``sizes`` under
    ``method`` (one of ``REF_METHODS``)."""
    n = len(sizes)
    if method in ("index", "index_timestep_zero"):
        return tuple(range(1, n + 1)), None
    if method == "negative_index":
        return tuple(-(i + 1) for i in range(n)), None
    if method in ("offset", "uxo"):  # ComfyUI lays out every other name the same way
        return (1,) * n, side_by_side_offsets(sizes, patch)
    raise ValueError(f"unknown reference latent method {method!r}; use one of {', '.join(REF_METHODS)}")


def joint_positions(
    grids: list[tuple[int, int]],
    text_len: int,
    frames: list[int] | tuple[int, ...] | None = None,
    min_text_start: int = 0,
    offsets: list[tuple[int, int]] | tuple[tuple[int, int], ...] | None = None,
) -> torch.Tensor:
    """Positions of the joint sequence ``[text; target image; reference 1; reference 2; ...]``.

    Image ``i`` of ``grids`` gets frame index ``frames[i]``; by default ``i`` (0 = the latent
    being denoised, then the references 1, 2, ...). Qwen-Image-Layered ("Layer3D" RoPE) gives
    its layer frames 0..L and its reference images -1, -2, ... (diffusers' negative table), and
    starts the text at least at ``min_text_start`` (the number of layer frames). ``offsets``
    (one ``(rows, columns)`` per image, in patches; None: all zero) shift images within their
    frame. The text start ignores them, as ComfyUI's does (it looks at the target alone).
    """
    if frames is None:
        frames = range(len(grids))
    elif len(frames) != len(grids):
        raise ValueError(f"RoPE: {len(frames)} frame indices for {len(grids)} images")
    if offsets is None:
        offsets = [(0, 0)] * len(grids)
    elif len(offsets) != len(grids):
        raise ValueError(f"RoPE: {len(offsets)} offsets for {len(grids)} images")
    parts = [text_positions(max(text_start(grids), min_text_start), text_len)]
    parts += [image_positions(f, h, w, off) for f, (h, w), off in zip(frames, grids, offsets)]
    return torch.cat(parts, dim=0)


def rope_angles(positions: torch.Tensor, axes_dims: tuple[int, ...], theta: float = THETA) -> torch.Tensor:
    """``[N, sum(axes_dims) // 2]`` float32 angles: axis ``a`` fills its own block of pairs."""
    angles = [
        positions[:, a].to(torch.float32)[:, None] * inverse_frequencies(dim, theta)[None, :]
        for a, dim in enumerate(axes_dims)
    ]
    return torch.cat(angles, dim=1)


def rotation_table(angles: torch.Tensor) -> torch.Tensor:
    """``[2, N, 1, P, 2]`` float32 table for ``apply_rope`` from ``[N, P]`` angles.

    For a pair (a, b) the rotated pair is ``a * [cos, sin] + b * [-sin, cos]``; entry 0 holds
    the first factor and entry 1 the second, shaped to broadcast over ``[B, N, heads, P, 2]``.
    """
    cos, sin = torch.cos(angles), torch.sin(angles)
    table = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)])
    return table.unsqueeze(2).contiguous()


def build_rope(
    grids: list[tuple[int, int]],
    text_len: int,
    axes_dims: tuple[int, ...],
    device: torch.device | str | None = None,
    theta: float = THETA,
    frames: list[int] | tuple[int, ...] | None = None,
    min_text_start: int = 0,
    offsets: list[tuple[int, int]] | tuple[tuple[int, int], ...] | None = None,
) -> torch.Tensor:
    """Rotation table of the joint sequence (see ``joint_positions``) on ``device``."""
    positions = joint_positions(grids, text_len, frames, min_text_start, offsets)
    table = rotation_table(rope_angles(positions, axes_dims, theta))
    return table.to(device) if device is not None else table


def apply_rope(x: torch.Tensor, table: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate ``x`` ``[B, N, heads, D]`` by ``table`` ``[2, N, 1, D//2, 2]``.

    The arithmetic is float32 (as in diffusers and ComfyUI) and rounds once to the output dtype.
    ``out`` (same shape as ``x``, any strides) receives the result directly, which lets the
    MMDiT write each stream into its slice of the joint attention input without a copy.
    """
    pairs = x.unflatten(-1, (-1, 2))
    first = pairs[..., :1] * table[0]
    if out is None:
        return first.addcmul_(pairs[..., 1:], table[1]).to(x.dtype).flatten(-2)
    torch.addcmul(first, pairs[..., 1:], table[1], out=out.unflatten(-1, (-1, 2)))
    return out
