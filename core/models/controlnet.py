"""Qwen-Image ControlNets: InstantX Union / Inpainting, DiffSynth blockwise patches, the 2512 Fun ControlNet.

All kinds steer the MMDiT through its ``control(block_index, img_tokens)`` hook (see
``mmdit.QwenImageMMDiT.forward``); only the target-image tokens are touched, so reference
latents of edit models pass through unchanged.

- InstantX (``InstantXControlNet``): a short copy of the MMDiT trunk (``img_in``, text input,
  timestep embedding, a few double-stream blocks) whose image input is
  ``img_in(x) + controlnet_x_embedder(packed control latent)``. After its block k a zero-initialised
  ``controlnet_blocks.k`` turns the image stream into a residual; the main model adds
  ``samples[i // ceil(L / n)] * strength`` after its block i (L main blocks, n control blocks).
  The trunk runs once per step on (x, sigma, positive text), and the same residuals serve the
  negative pass, as diffusers' QwenImageControlNetPipeline does.
- DiffSynth (``DiffSynthControlNet``): control tokens ``img_in(packed control latent)`` computed
  once; after main block i, ``img[:, :N] += block_i(img[:, :N], control) * strength`` with
  ``block_i(x, y) = output_proj(GELU(input_proj(RMSNorm(x) + RMSNorm(y))))``.
- Fun (``controlnet_fun.FunControlNet``, Qwen-Image-2512-Fun-Controlnet-Union): control blocks that
  run on the main model's embeddings each step, with each pass's own text; their residuals are
  added after main blocks 0, 12, 24, 36, 48 (see that module).

Control latents are *normalized* latents (``latent_format.normalize``); the inpainting variants
append one mask channel (1 = keep) before packing, so their embedders take 17 * 4 = 68 inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .controlnet_fun import FUN
from .mmdit import MMDiTConfig, QwenImageMMDiT, RMSNorm, pack_latent
from ..layers.linear import Linear

INSTANTX = "instantx"
DIFFSYNTH = "diffsynth"

# block_index, image tokens -> None (modified in place)
StepHook = Callable[[int, torch.Tensor], None]


# ---------------------------------------------------------------------------------------------
# InstantX


class InstantXControlNet(QwenImageMMDiT):
    """InstantX Qwen-Image ControlNet (Union: 64 control inputs; Inpainting: 68).

    Parameter names are diffusers' ``QwenImageControlNetModel`` keys. The trunk classes are the
    MMDiT's own; the output head (``norm_out`` / ``proj_out``) does not exist here.
    """

    kind = INSTANTX

    def __init__(self, config: MMDiTConfig | None = None, extra_condition_channels: int = 0, device=None, dtype=None):
        super().__init__(config or MMDiTConfig(num_layers=5), device=device, dtype=dtype)
        del self.norm_out, self.proj_out
        cfg, dim = self.config, self.config.inner_dim
        kw = dict(device=device, dtype=dtype)
        self.extra_condition_channels = int(extra_condition_channels)
        self.controlnet_blocks = nn.ModuleList(Linear(dim, dim, **kw) for _ in range(cfg.num_layers))
        self.controlnet_x_embedder = Linear(cfg.in_channels + self.extra_condition_channels, dim, **kw)

    @property
    def hint_channels(self) -> int:
        """Channels of the (unpacked) control latent: 16, or 17 with the inpainting mask."""
        return (self.config.in_channels + self.extra_condition_channels) // self.config.patch_size**2

    @property
    def is_inpaint(self) -> bool:
        return self.extra_condition_channels > 0

    def forward(self, x, sigma, context, hint, context_mask=None, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """The per-block samples ``[B, N, dim]`` (unscaled) for normalized latent ``x``
        ``[B, 16, H, W]``, ``sigma`` ``[B]`` in [0, 1], text ``context`` and the normalized control
        latent ``hint`` ``[B or 1, hint_channels, H, W]``. ``dtype`` overrides the compute dtype
        (the main model's, so both run alike)."""
        cfg = self.config
        if x.ndim == 5:
            x = x[:, :, 0]
        if hint.ndim == 5:
            hint = hint[:, :, 0]
        B, _, H, W = x.shape
        if hint.ndim != 4 or hint.shape[1] != self.hint_channels or tuple(hint.shape[-2:]) != (H, W):
            raise ValueError(f"the control latent must be [B, {self.hint_channels}, {H}, {W}] to match the latent, "
                             f"got {tuple(hint.shape)}")
        device = x.device
        dtype = dtype or self.compute_dtype
        wide = torch.float32 if dtype == torch.float16 else dtype
        sigma = self._check_sigma(sigma, B, device)
        context, mask = self._check_context(context, context_mask, B, device)

        tokens, grid = pack_latent(x, cfg.patch_size)
        hint_tokens, _ = pack_latent(hint.to(device), cfg.patch_size)
        img = self.img_in(tokens.to(wide)) + self.controlnet_x_embedder(hint_tokens.to(wide)).expand(B, -1, -1)
        txt = self.txt_in(self.txt_norm(context.to(wide)))

        shared = B == 1 or bool((sigma == sigma[0]).all())
        t = sigma[:1] if shared else sigma
        act = F.silu(self.time_text_embed(t.to(dtype), wide))
        table = self._rope_table([grid], txt.shape[1], device)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(B, img.shape[1])], dim=1)[:, None, None, :]
        samples = []
        last = len(self.transformer_blocks) - 1
        for i, (block, head) in enumerate(zip(self.transformer_blocks, self.controlnet_blocks)):
            img, txt = block(img, txt, act, act, [slice(None)], table, mask, dtype, need_txt=i < last)
            samples.append(head(img))  # now: the next block updates img in place
        return samples


# ---------------------------------------------------------------------------------------------
# DiffSynth


class BlockwiseControlBlock(nn.Module):
    """``output_proj(GELU(input_proj(x_rms(x) + y_rms(y))))`` (exact GELU)."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.x_rms = RMSNorm(dim, eps=1e-6, **kw)
        self.y_rms = RMSNorm(dim, eps=1e-6, **kw)
        self.input_proj = Linear(dim, dim, **kw)
        self.output_proj = Linear(dim, dim, **kw)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(self.x_rms(x) + self.y_rms(y.to(x.dtype)))
        return self.output_proj(F.gelu(h))


class DiffSynthControlNet(nn.Module):
    """DiffSynth-Studio's Qwen-Image blockwise ControlNet (a ComfyUI "model patch")."""

    kind = DIFFSYNTH

    def __init__(self, num_layers: int = 60, dim: int = 3072, in_channels: int = 64, extra_in_channels: int = 0,
                 patch_size: int = 2, device=None, dtype=None):
        super().__init__()
        self.patch_size = patch_size
        self.extra_in_channels = int(extra_in_channels)
        self.img_in = Linear(in_channels + self.extra_in_channels, dim, device=device, dtype=dtype)
        self.controlnet_blocks = nn.ModuleList(BlockwiseControlBlock(dim, device, dtype) for _ in range(num_layers))

    @property
    def hint_channels(self) -> int:
        return self.img_in.in_features // self.patch_size**2

    @property
    def is_inpaint(self) -> bool:
        return self.extra_in_channels > 0

    def embed(self, hint: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Control tokens ``[B, N, dim]`` from a normalized control latent ``[B, hint_channels, H, W]``."""
        if hint.ndim == 5:
            hint = hint[:, :, 0]
        if hint.ndim != 4 or hint.shape[1] != self.hint_channels:
            raise ValueError(f"the control latent must be [B, {self.hint_channels}, H, W], got {tuple(hint.shape)}")
        tokens, _ = pack_latent(hint, self.patch_size)
        return self.img_in(tokens.to(dtype))


# ---------------------------------------------------------------------------------------------
# one applied control and a chain of them


def interval(main_blocks: int, control_blocks: int) -> int:
    """Main-model blocks per InstantX sample: ``ceil(L / n)`` (12 for 60 blocks and Union's 5)."""
    return max(1, math.ceil(main_blocks / control_blocks))


def in_window(step: int, steps: int, start: float, end: float) -> bool:
    """diffusers' rule: step i of N is controlled unless i/N < start or (i+1)/N > end."""
    return not (step / steps < start or (step + 1) / steps > end)


def _match_batch(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if batch % t.shape[0] == 0:
        return t.repeat(batch // t.shape[0], *([1] * (t.ndim - 1)))
    raise ValueError(f"{what} has a batch of {t.shape[0]}, which does not divide the latent batch {batch}")


@dataclass(eq=False)
class AppliedControl:
    """A control model with its control image, strength and start/end window.

    ``hint_fn(h, w)`` returns the normalized control latent ``[1 or B, C, h, w]`` for a latent
    of ``h`` x ``w``; the node layer supplies it (VAE encoding and resizing live there) and
    ``prepare`` calls it once per latent size, before sampling.
    """

    net: nn.Module
    hint_fn: Callable[[int, int], torch.Tensor]
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        self._hint: torch.Tensor | None = None
        self._size: tuple[int, int] | None = None
        self._tokens: tuple | None = None  # DiffSynth control tokens, cached per device / dtype

    def prepare(self, h: int, w: int) -> torch.Tensor:
        if self._size != (h, w):
            self._hint, self._size, self._tokens = self.hint_fn(h, w), (h, w), None
        return self._hint

    def active(self, step: int, steps: int) -> bool:
        return self.strength != 0.0 and in_window(step, steps, self.start, self.end)

    def hook(self, module: QwenImageMMDiT, x, sigma, context, context_mask, step: int, steps: int) -> StepHook | None:
        """This step's hook, or None outside the window (the step is then exactly uncontrolled)."""
        if not self.active(step, steps):
            return None
        hint = self.prepare(x.shape[-2], x.shape[-1])
        dtype = module.compute_dtype
        n_target = _target_tokens(x, module.config.patch_size)
        if self.net.kind == INSTANTX:
            hint = _match_batch(hint.to(x.device), x.shape[0], "the control image")
            samples = self.net(x, sigma, context, hint, context_mask, dtype=dtype)
            every = interval(len(module.transformer_blocks), len(samples))
            scale = float(self.strength)

            def add_residual(i: int, img: torch.Tensor) -> None:
                r = samples[i // every]
                img[:, :n_target] += _match_batch(r, img.shape[0], "the ControlNet residual").to(img.dtype) * scale

            return add_residual
        if self.net.kind == FUN:
            return self._fun_hook(module, x, sigma, context, context_mask, hint, n_target)

        key = (x.device, dtype)
        if self._tokens is None or self._tokens[0] != key:
            self._tokens = (key, self.net.embed(hint.to(x.device), dtype))
        tokens = self._tokens[1]
        blocks = self.net.controlnet_blocks

        def add_block(i: int, img: torch.Tensor) -> None:
            if i >= len(blocks):
                return
            target = img[:, :n_target]
            y = _match_batch(tokens, img.shape[0], "the control image")
            target += blocks[i](target, y).to(img.dtype) * float(self.strength)

        return add_block

    def _fun_hook(self, module, x, sigma, context, context_mask, hint, n_target: int) -> StepHook:
        hint = _match_batch(hint.to(x.device), x.shape[0], "the control image")
        residuals = self.net(module, x, sigma, context, hint, context_mask, dtype=module.compute_dtype)
        after = dict(zip(self.net.injection_layers(len(module.transformer_blocks)), residuals))
        scale = float(self.strength)

        def add_fun(i: int, img: torch.Tensor) -> None:
            r = after.get(i)
            if r is not None:
                img[:, :n_target] += _match_batch(r, img.shape[0], "the ControlNet residual").to(img.dtype) * scale

        return add_fun


def _target_tokens(x: torch.Tensor, p: int) -> int:
    h, w = x.shape[-2], x.shape[-1]
    return ((h + p - 1) // p) * ((w + p - 1) // p)


def step_hook(controls: Sequence[AppliedControl], module: QwenImageMMDiT, x, sigma, context, context_mask,
              step: int, steps: int) -> StepHook | None:
    """One hook for a chain of controls at one sampling step (None when none is active).

    DiffSynth patches run before InstantX and Fun residuals after each block, as in ComfyUI;
    otherwise controls apply in the order they were chained.
    """
    hooks = [(c.net.kind != DIFFSYNTH, c.hook(module, x, sigma, context, context_mask, step, steps)) for c in controls]
    hooks = [h for _, h in sorted(hooks, key=lambda kh: kh[0]) if h is not None]
    if not hooks:
        return None
    if len(hooks) == 1:
        return hooks[0]

    def run_all(i: int, img: torch.Tensor) -> None:
        for h in hooks:
            h(i, img)

    return run_all
