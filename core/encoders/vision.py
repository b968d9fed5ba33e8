"""Qwen2.5-VL vision tower: image -> one feature per 2x2 patch group for the language model.

Parameter names are the checkpoints' ``visual.*`` names without the ``visual.`` prefix
(``patch_embed.proj``, ``blocks.N.{norm1,norm2,attn.qkv,attn.proj,mlp.*_proj}``,
``merger.{ln_q,mlp.0,mlp.2}``), which is what the text-encoder loader hands out.

Images are processed one at a time: every attention in the tower (windowed or full) stays
inside one image, so a batch of images is the concatenation of single-image results.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .text_encoder import RMSNorm
from ..layers.linear import Linear

# CLIP's normalization, which the Qwen2-VL image processor uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 3584
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6

    def __post_init__(self) -> None:
        self.fullatt_block_indexes = tuple(int(i) for i in self.fullatt_block_indexes)
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"vision config: hidden size {self.hidden_size} over {self.num_heads} heads must give a head size "
                "divisible by 4 (2-D rotary positions)"
            )
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ValueError(
                f"vision config: window_size {self.window_size} is not a multiple of "
                f"patch_size x spatial_merge_size = {self.patch_size * self.spatial_merge_size}"
            )

    @property
    def factor(self) -> int:
        """Image sides must be multiples of this (one merged token = factor x factor pixels)."""
        return self.patch_size * self.spatial_merge_size

    @classmethod
    def from_hf_config(cls, config: Mapping) -> "VisionConfig":
        """From transformers' ``vision_config`` (a dict or a config object)."""
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        kw = {}
        for ours, theirs in (("depth", "depth"), ("hidden_size", "hidden_size"), ("num_heads", "num_heads"),
                             ("intermediate_size", "intermediate_size"), ("out_hidden_size", "out_hidden_size"),
                             ("in_channels", "in_channels"), ("patch_size", "patch_size"),
                             ("temporal_patch_size", "temporal_patch_size"),
                             ("spatial_merge_size", "spatial_merge_size"), ("window_size", "window_size"),
                             ("fullatt_block_indexes", "fullatt_block_indexes")):
            value = get(theirs, None)
            if value is not None:
                kw[ours] = value
        rope = get("rope_parameters", None) or {}
        if isinstance(rope, Mapping) and rope.get("rope_theta") is not None:
            kw["rope_theta"] = float(rope["rope_theta"])
        return cls(**kw)

    @classmethod
    def infer_from_state_dict(cls, shapes: Mapping[str, tuple]) -> "VisionConfig":
        """From tensor shapes (names inside the tower). Two things weights do not record are
        assumed: the head size (80, as in every released Qwen2.5-VL; 16 for widths that 80 does
        not divide, i.e. tiny test models) and the full-attention blocks (the last of every 8
        blocks, and the last block: 7, 15, 23, 31 for the 32-block tower)."""
        def shape(key: str) -> tuple:
            if key not in shapes:
                raise ValueError(f"vision tower weights lack {key!r}")
            return tuple(int(s) for s in shapes[key])

        w = shape("patch_embed.proj.weight")
        if len(w) != 5:
            raise ValueError(f"patch_embed.proj.weight has shape {w}, expected a 5-D Conv3d kernel")
        hidden, _, temporal, patch, _ = w
        blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
        if not blocks or blocks != set(range(len(blocks))):
            raise ValueError(f"vision tower weights: blocks are not numbered 0..N-1 (found {sorted(blocks)[:8]})")
        depth = len(blocks)
        merge = int(round((shape("merger.mlp.0.weight")[1] // hidden) ** 0.5))
        head_dim = 80 if hidden % 80 == 0 else 16
        return cls(
            depth=depth, hidden_size=hidden, num_heads=hidden // head_dim,
            intermediate_size=shape("blocks.0.mlp.gate_proj.weight")[0],
            out_hidden_size=shape("merger.mlp.2.weight")[0],
            patch_size=patch, temporal_patch_size=temporal, spatial_merge_size=merge,
            window_size=4 * patch * merge,
            fullatt_block_indexes=tuple(i for i in range(depth) if i % 8 == 7 or i == depth - 1),
        )


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        # Kept as a Conv3d so the checkpoint's 5-D weight loads as is; applied as a matmul
        # because the patches arrive already cut out and flattened.
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return patches.to(w.dtype) @ w.reshape(w.shape[0], -1).t()


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, windows: list[torch.Tensor] | None):
        n, d = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if windows is None:
            out = _sdpa(q[None], k[None], v[None])[0]
        else:
            out = torch.empty_like(q)
            # Windows of the same length go through attention together; edge windows are smaller.
            for idx in windows:
                out[idx] = _sdpa(q[idx], k[idx], v[idx])
        return self.proj(out.reshape(n, d))


def _sdpa(q, k, v):
    # [B, L, heads, hd] -> attention per head -> same layout
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # "rotate half" pairs (i, i + d/2), in fp32 as the reference does, back to the input dtype.
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, windows):
        x = x + self.attn(self.norm1(x), cos, sin, windows)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.merged = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6)
        self.mlp = nn.Sequential(Linear(self.merged, self.merged), nn.GELU(), Linear(self.merged, cfg.out_hidden_size))

    def forward(self, x):
        return self.mlp(self.ln_q(x).reshape(-1, self.merged))


class QwenVisionTower(nn.Module):
    def __init__(self, config: VisionConfig | None = None):
        super().__init__()
        self.config = cfg = config or VisionConfig()
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.proj.weight.device

    def rope(self, grid_h: int, grid_w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[N, 1, head_dim]`` for patches in merge-block order; the first half of
        the rotated pairs follows the row, the second the column."""
        cfg = self.config
        head_dim = cfg.hidden_size // cfg.num_heads
        quarter = head_dim // 2
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float32, device=device) / quarter))
        rows, cols = patch_positions(grid_h, grid_w, cfg.spatial_merge_size, device)
        angles = torch.cat((rows[:, None].float() * inv, cols[:, None].float() * inv), dim=-1)
        angles = torch.cat((angles, angles), dim=-1)[:, None, :]
        return angles.cos(), angles.sin()

    def forward(self, patches: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """``patches`` ``[grid_h*grid_w, C*T*P*P]`` (see ``image_to_patches``) -> ``[grid_h*grid_w/4, out]``."""
        cfg = self.config
        n = grid_h * grid_w
        if patches.ndim != 2 or patches.shape[0] != n:
            raise ValueError(f"vision tower: expected {n} patches for a {grid_h}x{grid_w} grid, got {tuple(patches.shape)}")
        m = cfg.spatial_merge_size
        if grid_h % m or grid_w % m:
            raise ValueError(f"vision tower: patch grid {grid_h}x{grid_w} is not a multiple of the merge size {m}")
        x = self.patch_embed(patches.to(self.device))
        cos, sin = self.rope(grid_h, grid_w, x.device)
        windows = window_groups(grid_h, grid_w, cfg, x.device)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if i in cfg.fullatt_block_indexes else windows)
        return self.merger(x)


def patch_positions(grid_h: int, grid_w: int, merge: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each patch, patches ordered merge block by merge block (row-major
    blocks, row-major inside a block), the order the image processor emits them in."""
    r = torch.arange(grid_h, device=device).view(grid_h // merge, merge, 1, 1).expand(-1, -1, grid_w // merge, merge)
    c = torch.arange(grid_w, device=device).view(1, 1, grid_w // merge, merge).expand(grid_h // merge, merge, -1, -1)
    return r.permute(0, 2, 1, 3).reshape(-1), c.permute(0, 2, 1, 3).reshape(-1)


def window_groups(grid_h: int, grid_w: int, cfg: VisionConfig, device=None) -> list[torch.Tensor]:
    """Patch indices of each attention window, grouped by window length: a list of
    ``[n_windows, length]`` index tensors. Windows tile the merged grid in squares of
    ``window_size / factor`` merged tokens from the top-left; edge windows are cut short."""
    m = cfg.spatial_merge_size
    unit = m * m
    gh, gw = grid_h // m, grid_w // m
    ws = cfg.window_size // cfg.factor
    by_len: dict[int, list[torch.Tensor]] = {}
    units = torch.arange(gh * gw, device=device).view(gh, gw)
    for r0 in range(0, gh, ws):
        for c0 in range(0, gw, ws):
            u = units[r0:r0 + ws, c0:c0 + ws].reshape(-1)
            idx = (u[:, None] * unit + torch.arange(unit, device=device)).reshape(-1)
            by_len.setdefault(idx.numel(), []).append(idx)
    return [torch.stack(v) for v in by_len.values()]


def image_to_patches(pixels: torch.Tensor, cfg: VisionConfig) -> tuple[torch.Tensor, int, int]:
    """Normalized pixels ``[3, H, W]`` (H, W multiples of ``cfg.factor``) -> the tower's input
    ``[grid_h*grid_w, 3*T*P*P]`` and the patch grid. A still image fills both temporal slots."""
    c, h, w = pixels.shape
    p, m, t = cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size
    if h % (p * m) or w % (p * m):
        raise ValueError(f"image {w}x{h} is not a multiple of {p * m} pixels on each side")
    gh, gw = h // p, w // p
    x = pixels.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # blocks, merge, c, p, p
    x = x.unsqueeze(5).expand(*x.shape[:5], t, p, p)
    return x.reshape(gh * gw, c * t * p * p), gh, gw


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` in 0..1 -> CLIP-normalized, fp32."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return (pixels.float() - mean) / std


def build_vision_tower(state: Mapping[str, torch.Tensor], config: VisionConfig | None = None,
                       source: str = "text encoder") -> QwenVisionTower:
    """A tower from the vision tensors the text-encoder loader returns (names inside the tower).
    A missing or extra tensor is an error naming ``source``."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    try:
        cfg = config or VisionConfig.infer_from_state_dict(shapes)
    except ValueError as e:
        raise ValueError(f"{source}: the vision-tower weights are not a Qwen2.5-VL vision tower ({e})") from None
    with torch.device("meta"):
        tower = QwenVisionTower(cfg)
    expected = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
        if wrong:
            parts.append(f"wrong shape for {', '.join(f'{k} {shapes[k]} (expected {expected[k]})' for k in wrong[:3])}")
        raise ValueError(f"{source}: the vision-tower weights do not fit a Qwen2.5-VL vision tower: {'; '.join(parts)}")
    tower.load_state_dict(dict(state), strict=True, assign=True)
    return tower.eval().requires_grad_(False)
