"""Qwen-Image-2512 Fun ControlNet Union (alibaba-pai, VideoX-Fun's ``QwenImageControlTransformer2DModel``).

The file holds only the control branch, unprefixed (174 tensors for the released Union model):
``control_img_in`` ``[dim, 132]`` and ``control_blocks.N``: a full double-stream block (the MMDiT's
own names) plus ``after_proj`` ``[dim, dim]``; block 0 also has ``before_proj``. Everything else
(image / text input, timestep embedding, RoPE) is the *main* model's, so the branch runs per step
against the model being sampled:

    c = before_proj(control_img_in(hint tokens)) + img_in(x tokens)
    txt = txt_in(txt_norm(text)); for each control block k: (c, txt) = block_k(c, txt)  (the text
          stream carries on from block to block); residual_k = after_proj_k(c)

and the main model adds ``residual_k * strength`` to its target image tokens after block
``layers[k] = k * (L // n)`` (L main blocks, n control blocks: 0, 12, 24, 36, 48 for 5 on 60, VideoX's
``control_layers``). The residuals depend on the text, so the positive and negative passes each
run the branch with their own prompt (as VideoX and ComfyUI do).

The hint is a normalized latent of 33 channels, ``[control latent (16) | mask (1) | inpaint latent
(16)]``, packed 2x2 into 132 features. Without a mask and an image to repaint those 17 channels are
zeros, so a 16-channel control latent is padded with zeros (ComfyUI does the same). Odd latent sizes
pad the hint with zeros before packing (ComfyUI's rule; the image tokens pad circularly, as always).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import rope
from ..layers.linear import Linear
from .mmdit import QwenImageMMDiT, TransformerBlock, pack_latent

FUN = "fun"
CONTROL_CHANNELS = 16  # the control image's latent; the rest of the hint is mask + inpaint latent


class FunControlBlock(TransformerBlock):
    """An MMDiT double-stream block with ``after_proj`` (and ``before_proj`` on the first block)."""

    def __init__(self, dim: int, heads: int, head_dim: int, first: bool, device=None, dtype=None):
        super().__init__(dim, heads, head_dim, device=device, dtype=dtype)
        if first:
            self.before_proj = Linear(dim, dim, device=device, dtype=dtype)
        self.after_proj = Linear(dim, dim, device=device, dtype=dtype)


class FunControlNet(nn.Module):
    """The Fun ControlNet's control branch; parameter names are the file's keys."""

    kind = FUN
    is_inpaint = False  # the mask / inpaint-image channels are not wired: they stay zero

    def __init__(self, num_blocks: int = 5, dim: int = 3072, num_attention_heads: int = 24,
                 attention_head_dim: int = 128, in_features: int = 132, patch_size: int = 2, device=None, dtype=None):
        super().__init__()
        if num_blocks < 1:
            raise ValueError("a Fun ControlNet needs at least one control block")
        if in_features % patch_size**2:
            raise ValueError(f"control_img_in takes {in_features} features, not a multiple of {patch_size}x{patch_size}")
        self.patch_size = patch_size
        self.control_img_in = Linear(in_features, dim, device=device, dtype=dtype)
        self.control_blocks = nn.ModuleList(
            FunControlBlock(dim, num_attention_heads, attention_head_dim, i == 0, device, dtype) for i in range(num_blocks)
        )
        self._rope_cache: dict[tuple, torch.Tensor] = {}

    @property
    def hint_channels(self) -> int:
        """Latent channels of the full hint (33 for the released model)."""
        return self.control_img_in.in_features // self.patch_size**2

    def injection_layers(self, main_blocks: int) -> list[int]:
        """The main-model blocks after which each control block's residual is added."""
        n = len(self.control_blocks)
        if main_blocks < n:
            raise ValueError(f"this Fun ControlNet has {n} control blocks but the diffusion model only {main_blocks} "
                             "blocks; it belongs to another model")
        every = main_blocks // n
        return [k * every for k in range(n)]

    def pack_hint(self, hint: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Hint tokens ``[B, N, in_features]`` from a normalized latent ``[B, 16 or hint_channels, H, W]``."""
        if hint.ndim == 5:
            hint = hint[:, :, 0]
        full = self.hint_channels
        if hint.ndim != 4 or hint.shape[1] not in (CONTROL_CHANNELS, full) or tuple(hint.shape[-2:]) != tuple(size):
            raise ValueError(f"the control latent must be [B, {CONTROL_CHANNELS} or {full}, {size[0]}, {size[1]}] to "
                             f"match the latent, got {tuple(hint.shape)}")
        p = self.patch_size
        H, W = size
        hint = F.pad(hint, (0, (-W) % p, 0, (-H) % p, 0, full - hint.shape[1]))  # zeros: size, then channels
        return pack_latent(hint, p)[0]

    def _rope(self, grid: tuple[int, int], text_len: int, axes, device) -> torch.Tensor:
        key = (grid, text_len, tuple(axes), str(device))
        table = self._rope_cache.get(key)
        if table is None:
            if len(self._rope_cache) >= 8:
                self._rope_cache.pop(next(iter(self._rope_cache)))
            table = self._rope_cache[key] = rope.build_rope([grid], text_len, axes, device)
        return table

    def forward(self, main: QwenImageMMDiT, x: torch.Tensor, sigma, context: torch.Tensor, hint: torch.Tensor,
                context_mask: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """The residuals ``[B, N, dim]`` (unscaled), one per control block, for the main model
        ``main`` at normalized latent ``x`` ``[B, 16, H, W]``, ``sigma`` ``[B]`` (or a scalar),
        text ``context`` ``[1 or B, L, D]`` (``context_mask`` ``[1 or B, L]``: True for real tokens)
        and the normalized hint ``[1 or B, 16 or hint_channels, H, W]``. ``dtype``: the compute dtype
        (default: the main model's)."""
        cfg = main.config
        if getattr(cfg, "zero_cond_t", False):
            raise ValueError(
                "the Qwen-Image-2512 Fun ControlNet is made for the text-to-image Qwen-Image models (Qwen-Image-2512, "
                "Qwen-Image), and the model being sampled is Qwen-Image-Edit-2511, with which its authors (VideoX-Fun) "
                "do not run it; connect a Qwen-Image-2512 model (e.g. qwen_image_2512_fp8_e4m3fn.safetensors) to the "
                "sampler instead, or leave the Fun ControlNet out of edits")
        if x.ndim == 5:
            if x.shape[2] != 1:
                raise ValueError(f"the Fun ControlNet steers single images; this latent holds {x.shape[2]} frames "
                                 "(Qwen-Image-Layered layers): disconnect the Apply ControlNet node from this sampler")
            x = x[:, :, 0]
        B, _, H, W = x.shape
        device = x.device
        dtype = dtype or main.compute_dtype
        wide = torch.float32 if dtype == torch.float16 else dtype
        sigma = torch.as_tensor(sigma, device=device).float().reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(B)
        if sigma.numel() != B:
            raise ValueError(f"sigma must be a scalar or have {B} entries, got {sigma.numel()}")
        if context.ndim != 3 or context.shape[-1] != cfg.joint_attention_dim or context.shape[0] not in (1, B):
            raise ValueError(f"context must be [{B}, L, {cfg.joint_attention_dim}], got {tuple(context.shape)}")
        context = context.to(device).expand(B, -1, -1)
        mask = None
        if context_mask is not None:
            mask = (context_mask.to(device) != 0).expand(B, -1)
            used = mask.any(dim=0).nonzero()
            keep = int(used[-1]) + 1 if used.numel() else 1
            context, mask = context[:, :keep], mask[:, :keep]
            mask = None if bool(mask.all()) else mask

        tokens, grid = pack_latent(x, cfg.patch_size)
        hint_tokens = self.pack_hint(hint.to(device), (H, W))
        img = main.img_in(tokens.to(wide))
        c = self.control_img_in(hint_tokens.to(wide))
        if c.shape[0] not in (1, B):
            raise ValueError(f"the control latent has a batch of {c.shape[0]}, the latent {B}")
        txt = main.txt_in(main.txt_norm(context.to(wide)))

        shared = B == 1 or bool((sigma == sigma[0]).all())
        act = F.silu(main.time_text_embed((sigma[:1] if shared else sigma).to(dtype), wide))
        table = self._rope(grid, txt.shape[1], cfg.axes_dims_rope, device)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(B, img.shape[1])], dim=1)[:, None, None, :]

        blocks = self.control_blocks
        c = blocks[0].before_proj(c) + img
        residuals = []
        for i, block in enumerate(blocks):
            c, txt = block(c, txt, act, act, [slice(None)], table, mask, dtype, need_txt=i < len(blocks) - 1)
            residuals.append(block.after_proj(c))  # a new tensor: the next block updates c in place
        return residuals
