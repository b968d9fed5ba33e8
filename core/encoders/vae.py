"""The Wan-2.1 VAE used by Qwen-Image, single-image path, with tiled encode / decode.

Parameter names and shapes are those of the original Wan checkpoints (``encoder.conv1``,
``encoder.downsamples.N.residual.2``, ``decoder.upsamples.N.resample.1``, top-level
``conv1`` / ``conv2``, ...), so ``vae/qwen_image_vae.safetensors`` loads strictly as it is;
diffusers folders are renamed by ``keymaps/vae.py``.

Qwen-Image-Layered's VAE is the same network with 4 pixel channels (RGBA) instead of 3
(``VAEConfig.input_channels``, diffusers' name): its encoder takes RGBA and its decoder gives
RGBA, alpha being simply the fourth channel.

Only one frame is ever computed. The 3-D causal convolutions keep their 5-D weights, but for a
single frame the causal zero padding in time means only the last temporal tap of each kernel
meets real data, so they run as 2-D convolutions with that tap; ``time_conv`` layers are kept
for loading and never run.
"""
from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F


logger = logging.getLogger(__name__)

_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {e for e in (getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError) if e is not None}
)
_FP16_MAX = torch.finfo(torch.float16).max

ProgressFn = Callable[[int, int], None]


@dataclass
class VAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    input_channels: int = 3  # pixel channels: 3 (RGB), 4 for Qwen-Image-Layered's RGBA VAE

    def __post_init__(self) -> None:
        self.dim_mult = tuple(int(m) for m in self.dim_mult)
        self.temporal_downsample = tuple(bool(t) for t in self.temporal_downsample)
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"VAEConfig: temporal_downsample has {len(self.temporal_downsample)} entries, expected "
                f"{len(self.dim_mult) - 1} (one per downsampling stage of dim_mult {self.dim_mult})"
            )
        if self.base_dim < 1 or self.z_dim < 1 or self.num_res_blocks < 1 or not self.dim_mult:
            raise ValueError(f"VAEConfig: invalid sizes {self}")
        if self.input_channels not in (3, 4):
            raise ValueError(f"VAEConfig: input_channels must be 3 (RGB) or 4 (RGBA), got {self.input_channels}")

    @property
    def rgba(self) -> bool:
        """The Qwen-Image-Layered VAE (4 pixel channels)."""
        return self.input_channels == 4

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> "VAEConfig":
        """From the ``config.json`` of a diffusers ``AutoencoderKLQwenImage`` (or Wan-2.1 ``AutoencoderKLWan``)."""
        if config.get("is_residual") or config.get("attn_scales"):
            raise ValueError(
                "VAE config describes a Wan-2.2 style VAE (is_residual / attn_scales), "
                "expected the Wan-2.1 / Qwen-Image VAE"
            )
        d = cls()
        temporal = config.get("temperal_downsample", config.get("temporal_downsample", d.temporal_downsample))
        return cls(
            base_dim=int(config.get("base_dim", d.base_dim)),
            z_dim=int(config.get("z_dim", d.z_dim)),
            dim_mult=tuple(config.get("dim_mult", d.dim_mult)),
            num_res_blocks=int(config.get("num_res_blocks", d.num_res_blocks)),
            temporal_downsample=tuple(temporal),
            input_channels=int(config.get("input_channels", d.input_channels)),
        )


# ---------------------------------------------------------------------------------------------
# layers


def _keep_finite(x: torch.Tensor) -> torch.Tensor:
    # fp16 residual sums can exceed 65504; an inf would turn into NaN at the next norm.
    return x.clamp(-_FP16_MAX, _FP16_MAX) if x.dtype == torch.float16 else x


class CausalConv3d(nn.Conv3d):
    """A Wan causal 3-D conv, stored 5-D as in the checkpoints, applied to one frame.

    With one frame the causal padding puts zeros before it, so only the kernel's last temporal
    tap contributes: a 2-D conv with ``weight[:, :, -1]`` and "same" spatial padding.
    Slicing in ``forward`` keeps it right after ``.to()`` or a weight swap.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel, stride=1):
        super().__init__(in_ch, out_ch, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight[:, :, -1].to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, w, b, padding=(w.shape[-2] // 2, w.shape[-1] // 2))


class Conv2d(nn.Conv2d):
    """nn.Conv2d whose weight follows the activation dtype (files may mix dtypes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, self.weight.to(x.dtype), b)


class RMSNorm(nn.Module):
    """Channel RMS norm: F.normalize over channels * sqrt(C) * gamma.

    ``gamma`` keeps the checkpoint shape: [C, 1, 1] for the attention norm (``images=True``),
    [C, 1, 1, 1] elsewhere (written for video tensors).
    """

    def __init__(self, dim: int, images: bool = True, bias: bool = False):
        super().__init__()
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            out = F.normalize(x, dim=1) * self.scale
        else:
            # The norm is taken in fp32 (half-precision squares overflow) without an fp32 copy of x.
            norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
            factor = (self.scale / norm.clamp_min(1e-12)).clamp_max(torch.finfo(x.dtype).max).to(x.dtype)
            out = x * factor
        out = out * self.gamma.reshape(1, -1, 1, 1).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1).to(x.dtype)
        return out


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Index 5 held a Dropout in Wan; the Identity keeps the checkpoint numbering (residual.6).
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3),
            RMSNorm(out_dim, images=False),
            nn.SiLU(),
            nn.Identity(),
            CausalConv3d(out_dim, out_dim, 3),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _keep_finite(self.residual(x) + self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels of the feature map."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = Conv2d(dim, dim * 3, 1)
        self.proj = Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2)
        q, k, v = (t.unsqueeze(1) for t in qkv.unbind(1))  # [b, 1 head, h*w, c]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return _keep_finite(x + self.proj(out))


class Upsample2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


class Resample(nn.Module):
    """Spatial 2x up (nearest + conv to C/2) or down (pad right/bottom + stride-2 conv).

    ``temporal`` only adds the unused ``time_conv`` so video-trained checkpoints load strictly.
    """

    def __init__(self, dim: int, up: bool, temporal: bool):
        super().__init__()
        if up:
            self.resample = nn.Sequential(Upsample2x(), Conv2d(dim, dim // 2, 3, padding=1))
            if temporal:
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), Conv2d(dim, dim, 3, stride=2))
            if temporal:
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(dim: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim, images=False), nn.SiLU(), CausalConv3d(dim, out_ch, 3))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(cfg.input_channels, dims[0], 3)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                layers.append(Resample(out_dim, up=False, temporal=cfg.temporal_downsample[i]))
        self.downsamples = nn.Sequential(*layers)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], 2 * cfg.z_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.middle(self.downsamples(self.conv1(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_up = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3)
        self.middle = _middle(dims[0])
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous upsample halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(mult) - 1:
                layers.append(Resample(out_dim, up=True, temporal=temporal_up[i]))
        self.upsamples = nn.Sequential(*layers)
        self.head = _head(dims[-1], cfg.input_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.upsamples(self.middle(self.conv1(z))))


# ---------------------------------------------------------------------------------------------
# tiling helpers


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of equal tiles covering ``size`` with at least ~``overlap`` shared, the last flush with the end."""
    if size <= tile:
        return [0]
    n = math.ceil((size - tile) / (tile - overlap)) + 1
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _axis_weights(starts: list[int], tile: int, scale: int) -> list[torch.Tensor]:
    """Per tile, a 1-D weight that ramps linearly across each overlap with a neighbour.

    In an overlap of L samples one tile weighs (L-k)/(L+1) and the next (k+1)/(L+1): they sum
    to one, never reach zero, and image borders keep full weight.
    """
    out = []
    for i, s in enumerate(starts):
        w = torch.ones(tile * scale)
        if i > 0:
            ov = (starts[i - 1] + tile - s) * scale
            if ov > 0:
                w[:ov] = torch.minimum(w[:ov], torch.arange(1, ov + 1) / (ov + 1))
        if i < len(starts) - 1:
            ov = (s + tile - starts[i + 1]) * scale
            if ov > 0:
                w[-ov:] = torch.minimum(w[-ov:], torch.arange(ov, 0, -1) / (ov + 1))
        out.append(w)
    return out


def _free_cache() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


# ---------------------------------------------------------------------------------------------
# the model


class WanVAE(nn.Module):
    """Wan-2.1 / Qwen-Image VAE. Computes in the dtype and on the device of its weights.

    ``encode``: pixels [B,3,H,W] (or [B,3,1,H,W]) in [-1,1] -> raw latent mean [B,z,H//8,W//8];
    the RGBA VAE takes [B,4,H,W], and an RGB input gets an opaque alpha (+1) as ComfyUI pads it.
    Sizes that are not multiples of 8 are padded by edge replication and the latent cropped to
    the floor size: the kept latent pixels see their real right/bottom neighbours instead of a
    hard crop, and the result has the size a decode of a cropped image would have.
    ``decode``: raw latent [B,z,h,w] (or [B,z,1,h,w]) -> pixels [B,C,8h,8w] clamped to [-1,1]
    (C = ``config.input_channels``: 3, or 4 with alpha last).
    Results are in the module's dtype.
    """

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config or VAEConfig()
        z = self.config.z_dim
        self.encoder = Encoder(self.config)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = Decoder(self.config)

    @property
    def dtype(self) -> torch.dtype:
        dt = self.conv2.weight.dtype
        return dt if dt.is_floating_point and dt.itemsize >= 2 else torch.bfloat16

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    # -- input checks ------------------------------------------------------------------------

    def _as_4d(self, x: torch.Tensor, channels: int, what: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"VAE {what}: expected a tensor, got {type(x).__name__}")
        if x.dim() == 5:
            if x.shape[2] != 1:
                raise ValueError(
                    f"VAE {what}: got {x.shape[2]} frames in {list(x.shape)}; this VAE path handles single images "
                    f"([B,{channels},H,W] or [B,{channels},1,H,W])"
                )
            x = x[:, :, 0]
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"VAE {what}: expected [B,{channels},H,W] or [B,{channels},1,H,W], got {list(x.shape)}")
        if x.shape[0] == 0 or x.shape[-1] == 0 or x.shape[-2] == 0:
            raise ValueError(f"VAE {what}: empty tensor {list(x.shape)}")
        return x.to(device=self.device, dtype=self.dtype)

    def _pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Pixels in module dtype, replicate-padded to a multiple of the spatial factor, plus the latent size."""
        c = self.config.input_channels
        if c == 4 and isinstance(pixels, torch.Tensor) and pixels.dim() in (4, 5) and pixels.shape[1] == 3:
            # RGB into the RGBA VAE: fully opaque (alpha 1 in [0, 1], +1 in the VAE's [-1, 1]).
            pixels = torch.cat([pixels, torch.ones_like(pixels[:, :1])], dim=1)
        x = self._as_4d(pixels, c, "encode")
        f = self.config.spatial_factor
        h, w = x.shape[-2:]
        if h < f or w < f:
            raise ValueError(f"VAE encode: image {w}x{h} is smaller than the {f}x{f} pixels of one latent pixel")
        pad_h, pad_w = -h % f, -w % f
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        return x, h // f, w // f

    # -- full passes -----------------------------------------------------------------------------

    def _encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        # The posterior's mode is its mean: the first z_dim channels after conv1.
        return self.conv1(self.encoder(x))[:, : self.config.z_dim]

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.conv2(z)).clamp_(-1.0, 1.0)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        x, lh, lw = self._pixels(pixels)
        return self._encode_mean(x)[..., :lh, :lw]

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._decode_raw(self._as_4d(z, self.config.z_dim, "decode"))

    # -- tiled passes ----------------------------------------------------------------------------

    def _tiled(
        self,
        x: torch.Tensor,
        fn: Callable[[torch.Tensor], torch.Tensor],
        out_channels: int,
        size: tuple[int, int],
        tile: int,
        overlap: int,
        in_scale: int,
        out_scale: int,
        progress: ProgressFn | None,
    ) -> torch.Tensor:
        """Run ``fn`` on overlapping tiles and blend. Tiles are laid out in latent units;
        ``in_scale`` / ``out_scale`` convert latent units to the input / output tensors."""
        if tile < 1 or overlap < 0 or overlap >= tile:
            raise ValueError(f"VAE tiling: need tile > overlap >= 0, got tile {tile}, overlap {overlap} (latent px)")
        h, w = size
        th, tw = min(tile, h), min(tile, w)
        ys, xs = _tile_starts(h, th, overlap), _tile_starts(w, tw, overlap)
        wy, wx = _axis_weights(ys, th, out_scale), _axis_weights(xs, tw, out_scale)
        out = torch.zeros(x.shape[0], out_channels, h * out_scale, w * out_scale, device=x.device)
        weight = torch.zeros(1, 1, h * out_scale, w * out_scale, device=x.device)
        total, done = len(ys) * len(xs), 0
        for iy, y in enumerate(ys):
            for ix, x0 in enumerate(xs):
                part = fn(x[..., y * in_scale : (y + th) * in_scale, x0 * in_scale : (x0 + tw) * in_scale])
                m = (wy[iy][:, None] * wx[ix][None, :]).to(x.device)
                ry = slice(y * out_scale, (y + th) * out_scale)
                rx = slice(x0 * out_scale, (x0 + tw) * out_scale)
                out[..., ry, rx] += part.float() * m
                weight[..., ry, rx] += m
                del part
                done += 1
                if progress is not None:
                    progress(done, total)
        return (out / weight).to(self.dtype)

    @torch.no_grad()
    def decode_tiled(
        self, z: torch.Tensor, tile: int = 64, overlap: int = 16, progress: ProgressFn | None = None
    ) -> torch.Tensor:
        """Decode in overlapping latent tiles (``tile`` / ``overlap`` in latent pixels; 64/16 -> 512 px
        tiles crossfaded over 128 px). ``progress(done, total)`` is called after each tile."""
        z = self._as_4d(z, self.config.z_dim, "decode")
        f = self.config.spatial_factor
        return self._tiled(z, self._decode_raw, self.config.input_channels, tuple(z.shape[-2:]), tile, overlap, 1, f,
                           progress)

    @torch.no_grad()
    def encode_tiled(
        self, pixels: torch.Tensor, tile: int = 512, overlap: int = 64, progress: ProgressFn | None = None
    ) -> torch.Tensor:
        """Encode in overlapping pixel tiles (``tile`` / ``overlap`` in pixels, rounded down to
        multiples of 8). Same size handling as ``encode``."""
        x, lh, lw = self._pixels(pixels)
        f = self.config.spatial_factor
        z = self._tiled(
            x, self._encode_mean, self.config.z_dim, (x.shape[-2] // f, x.shape[-1] // f),
            tile // f, overlap // f, f, 1, progress,
        )
        return z[..., :lh, :lw]

    # -- out-of-memory fallbacks -----------------------------------------------------------------

    def _with_fallback(self, full, tiled, x, tile: int, overlap: int, min_tile: int, what: str, progress):
        try:
            return full(x)
        except _OOM_ERRORS as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        # Retried outside the except block so the failed pass's frames (and tensors) are gone.
        _free_cache()
        logger.warning("VAE %s ran out of memory (%s); retrying tiled (tile %d, overlap %d)", what, reason, tile, overlap)
        while True:
            try:
                return tiled(x, tile=tile, overlap=overlap, progress=progress)
            except _OOM_ERRORS:
                if tile // 2 < min_tile:
                    raise
            _free_cache()
            tile, overlap = tile // 2, overlap // 2
            logger.warning("VAE tiled %s ran out of memory; retrying with tile %d, overlap %d", what, tile, overlap)

    def decode_auto(
        self, z: torch.Tensor, tile: int = 64, overlap: int = 16, progress: ProgressFn | None = None
    ) -> torch.Tensor:
        """``decode``; on out-of-memory frees the cache and decodes tiled, halving tiles while it still fails."""
        return self._with_fallback(self.decode, self.decode_tiled, z, tile, overlap, 8, "decode", progress)

    def encode_auto(
        self, pixels: torch.Tensor, tile: int = 512, overlap: int = 64, progress: ProgressFn | None = None
    ) -> torch.Tensor:
        """``encode``; on out-of-memory frees the cache and encodes tiled, halving tiles while it still fails."""
        return self._with_fallback(self.encode, self.encode_tiled, pixels, tile, overlap, 64, "encode", progress)
