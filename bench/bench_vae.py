#!/usr/bin/env python
"""VAE decode at 1328^2 and 2048^2 under an 8 GB cap: untiled, tiled, and the node's auto mode;
seams of the tiled decode checked against the untiled decode of the same latent.

Target (issue "Speed and memory"): both sizes decode at the 8 GB cap without running out of
memory (tiling), with the tiled result close to the untiled one (no visible seams).

The reference untiled decode runs without the cap (skipped if even that runs out of memory).
Under the cap: ``decode`` (may run out of memory: reported, not fatal), ``decode_tiled`` and
``decode_auto`` (what the VAE Decode node's ``tiled=auto`` runs: full, then tiled on OOM).
Seams: max / mean absolute difference against the untiled decode, PSNR over [-1, 1], and the
same maximum measured only on the tile-boundary bands (where a seam would show).

    python bench/bench_vae.py                   # 1328 and 2048, 8 GB cap, bf16
    python bench/bench_vae.py --cap-gb 12 --sizes 2048
    python bench/bench_vae.py --smoke
"""
from __future__ import annotations

try:
    from . import common
except ImportError:  # run as a script
    import common

import math

import torch

TILE, OVERLAP = 64, 16  # the node's defaults, latent pixels


def parse_args(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--sizes", default=None, help="square sizes in pixels (default 1328,2048)")
    p.add_argument("--cap-gb", type=float, default=8.0)
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="bf16")
    args = common.finish_args(p.parse_args(argv), warmup=1, iters=2)
    args.sizes = [int(s) for s in (args.sizes or ("64" if args.smoke else "1328,2048")).split(",")]
    return args


def build_vae(device, dtype, smoke: bool):
    vae = common.pack("core.encoders.vae")
    cfg = vae.VAEConfig(base_dim=8) if smoke else vae.VAEConfig()
    with torch.device("meta"):
        model = vae.WanVAE(cfg)
    return common.materialize(model, device, dtype)


def seam_band_mask(size_lat: int, scale: int, tile: int, overlap: int) -> torch.Tensor:
    """Pixels within the overlap bands between tiles along one axis (where blending happens)."""
    vae = common.pack("core.encoders.vae")
    starts = vae._tile_starts(size_lat, min(tile, size_lat), overlap)
    band = torch.zeros(size_lat * scale, dtype=torch.bool)
    for s in starts[1:]:
        band[s * scale : (s + overlap) * scale] = True
    return band


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = args.device, common.DTYPES[args.dtype]
    print(common.environment(device))
    model = build_vae(device, dtype, args.smoke)
    oom = (torch.OutOfMemoryError, MemoryError)
    tile, overlap = (TILE, OVERLAP) if not args.smoke else (4, 1)
    rows, results = [], {}
    for size in args.sizes:
        lat = size // 8
        g = torch.Generator(device=device).manual_seed(size)
        z = torch.randn(1, 16, lat, lat, generator=g, device=device).to(dtype)
        ref = None
        try:
            with torch.inference_mode():
                ref = model.decode(z).float().cpu()
        except oom:
            common.free(device)
        modes = {
            "untiled": lambda: model.decode(z),
            "tiled": lambda: model.decode_tiled(z, tile=tile, overlap=overlap),
            "auto (node default)": lambda: model.decode_auto(z, tile=tile, overlap=overlap),
        }
        for name, fn in modes.items():
            def run(fn=fn):
                with torch.inference_mode():
                    return fn()
            with common.memory_cap(device, args.cap_gb):
                try:
                    seconds, out = common.time_fn(run, device, args.warmup, args.iters)
                    peak = common.peak_bytes(device)
                    out = out.float().cpu()
                except oom:
                    common.free(device)
                    rows.append([f"{size}^2", name, "out of memory", "-", "-", "-", "-"])
                    results[(size, name)] = None
                    continue
            seam = ["-"] * 3
            if ref is not None and name != "untiled":
                diff = (out - ref).abs()
                mse = float(diff.pow(2).mean())
                psnr = 10 * math.log10(4.0 / mse) if mse > 0 else float("inf")
                band = seam_band_mask(lat, 8, tile, overlap)
                band2d = band[:, None] | band[None, :]
                band_max = float(diff[..., band2d].max()) if bool(band2d.any()) else 0.0
                seam = [f"{float(diff.max()):.3f} / {float(diff.mean()):.4f}", f"{psnr:.1f} dB", f"{band_max:.3f}"]
            elif name == "untiled" and ref is not None:
                seam = ["reference", "-", "-"]
            rows.append([f"{size}^2", name, common.fmt_ms(seconds), common.fmt_gib(peak), *seam])
            results[(size, name)] = seconds
        if ref is None:
            rows.append([f"{size}^2", "(untiled reference without cap ran out of memory: no seam check)"] + ["-"] * 5)
    cap = f"{args.cap_gb:g} GiB cap" if device.type == "cuda" else "no cap on the CPU"
    common.print_table(
        f"VAE decode, {args.dtype}, {cap}, tiles {tile}/{overlap} latent px{common.smoke_note(args)}",
        ["size", "mode", "time", "peak VRAM", "max / mean abs diff vs untiled", "PSNR vs untiled", "max abs diff on tile seams"],
        rows,
        notes=["target: both sizes complete under the 8 GB cap; tiled close to untiled (pixels in [-1, 1])"],
    )
    return results


if __name__ == "__main__":
    main()
