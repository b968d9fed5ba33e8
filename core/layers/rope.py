"""Rotary position embedding of the Qwen-Image MMDiT (MSRoPE), matching diffusers.

Each head's channels are rotated as interleaved pairs ``(x[2i], x[2i+1])``. The pairs are split
between three axes, ``axes_dims = (frame, height, width)`` channels (16, 56, 56 for the real
model). Image tokens (row-major) sit at ``(frame index, centred row, centred column)``; text
tokens sit on the diagonal after the largest image half-extent (FACTS 2).

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


def image_positions(frame: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """``[grid_h * grid_w, 3]`` (frame, row, column) positions in row-major token order."""
    rows = centred_positions(grid_h)[:, None].expand(grid_h, grid_w)
    cols = centred_positions(grid_w)[None, :].expand(grid_h, grid_w)
    frames = torch.full((grid_h, grid_w), frame, dtype=rows.dtype)
    return torch.stack([frames, rows, cols], dim=-1).reshape(-1, 3)


def text_start(grids: list[tuple[int, int]]) -> int:
    """First text position: the largest ``max(h//2, w//2)`` over all images in the sequence."""
    return max(max(h // 2, w // 2) for h, w in grids)


def text_positions(start: int, length: int) -> torch.Tensor:
    """``[length, 3]``: text token j sits at ``start + j`` on all three axes."""
    return (torch.arange(length) + start)[:, None].expand(length, 3)


def joint_positions(
    grids: list[tuple[int, int]],
    text_len: int,
    frames: list[int] | tuple[int, ...] | None = None,
    min_text_start: int = 0,
) -> torch.Tensor:
    """Positions of the joint sequence ``[text; target image; reference 1; reference 2; ...]``.

    Image ``i`` of ``grids`` gets frame index ``frames[i]``; by default ``i`` (0 = the latent
    being denoised, then the references 1, 2, ...). Qwen-Image-Layered ("Layer3D" RoPE) gives
    its layer frames 0..L and its reference images -1, -2, ... (diffusers' negative table), and
    starts the text at least at ``min_text_start`` (the number of layer frames).
    """
    if frames is None:
        frames = range(len(grids))
    elif len(frames) != len(grids):
        raise ValueError(f"RoPE: {len(frames)} frame indices for {len(grids)} images")
    parts = [text_positions(max(text_start(grids), min_text_start), text_len)]
    parts += [image_positions(f, h, w) for f, (h, w) in zip(frames, grids)]
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
) -> torch.Tensor:
    """Rotation table of the joint sequence (see ``joint_positions``) on ``device``."""
    positions = joint_positions(grids, text_len, frames, min_text_start)
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
