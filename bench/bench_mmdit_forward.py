#!/usr/bin/env python
"""Forward-pass time of the Qwen-Image MMDiT: ours vs diffusers vs ComfyUI, against the FLOP floor.

All models get the same random weights (seeded per parameter name; the three share key names),
so their outputs are compared too. Only one model's weights are on the device at a time.

    python bench/bench_mmdit_forward.py                     # full 60-layer model, bf16, CUDA
    python bench/bench_mmdit_forward.py --quick             # 1024^2, batch 1 only
    python bench/bench_mmdit_forward.py --comfy-path ~/ComfyUI --models ours,comfy
    python bench/bench_mmdit_forward.py --models ours --compile   # adds ours with torch.compile'd blocks
    # logic check on a CPU, tiny model:
    python bench/bench_mmdit_forward.py --device cpu --dtype fp32 --layers 1 --heads 2 \
        --head-dim 32 --joint-dim 64 --sizes 64,72 --text-tokens 8 --warmup 0 --iters 1

FLOP floor: per token (image and text) 2 x (QKV + out + MLP linear params) per layer
(= 2 x 6.8e9 for 60 layers, FACTS 2) plus attention 4 x L^2 x dim per layer, divided by --peak
(dense bf16 peak; H100 SXM: 989e12 FLOP/s).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import sys
import time
import types
import zlib
from pathlib import Path

import torch

try:
    from . import common
except ImportError:  # run as a script
    import common

ROOT = Path(__file__).resolve().parent.parent
FLOOR_TARGET = 1.25  # ours at 1328^2 batch 1: <= 1.25x the FLOP floor
COMFY_TARGET = 0.80  # ours <= 0.80x ComfyUI's native model in the same run
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COMPILED = "ours+compile"  # ours, its blocks run through torch.compile


def import_pack():
    """Import ``qwenimage_pack.core`` without running the pack's ComfyUI-facing __init__."""
    if "qwenimage_pack" not in sys.modules:
        pkg = types.ModuleType("qwenimage_pack")
        pkg.__path__ = [str(ROOT)]
        sys.modules["qwenimage_pack"] = pkg
    mmdit = importlib.import_module("qwenimage_pack.core.models.mmdit")
    attention = importlib.import_module("qwenimage_pack.core.layers.attention")
    return mmdit, attention


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--layers", type=int, default=60)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--joint-dim", type=int, default=3584)
    p.add_argument("--sizes", default="1024,1328", help="square image sizes in pixels (latent = size/8)")
    p.add_argument("--batches", default="1,2")
    p.add_argument("--text-tokens", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--peak", type=float, default=989e12, help="dense peak FLOP/s of the device for --dtype")
    p.add_argument("--quick", action="store_true", help="first size and first batch only")
    p.add_argument("--models", default="ours,diffusers,comfy")
    p.add_argument("--attention", default="sdpa", help="our attention backend: sdpa, cudnn, flash or sage")
    p.add_argument("--comfy-path", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout to import comfy from")
    p.add_argument("--compile", action="store_true",
                   help="also time ours with torch.compile'd blocks (core/pipeline/compile.py; first call compiles)")
    p.add_argument("--compile-mode", default="default", choices=("default", "max-autotune-no-cudagraphs"),
                   help="inductor mode of --compile")
    common.add_output_args(p)
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        args.sizes, args.batches = args.sizes[:1], args.batches[:1]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.compile and COMPILED not in args.models:
        args.models.append(COMPILED)
    if any(s % 16 for s in args.sizes):
        p.error("--sizes must be multiples of 16 (latent size / patch size must be whole)")
    return args


def model_config(args, mmdit):
    return mmdit.MMDiTConfig(
        num_layers=args.layers,
        attention_head_dim=args.head_dim,
        num_attention_heads=args.heads,
        joint_attention_dim=args.joint_dim,
        axes_dims_rope=mmdit.default_axes(args.head_dim),
    )


def flop_count(cfg, n_img: int, n_txt: int, batch: int) -> float:
    dim = cfg.inner_dim
    linear_params = 4 * dim * dim + 2 * dim * 4 * dim  # q, k, v, out + MLP, per stream and layer
    seq = n_img + n_txt
    per_layer = 2 * linear_params * seq + 4 * seq * seq * dim
    return float(batch * cfg.num_layers * per_layer)


@torch.no_grad()
def init_weights(model: torch.nn.Module, device) -> None:
    """Same values for the same parameter name in every implementation; sane magnitudes."""
    for name, p in model.named_parameters():
        g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
        if p.ndim == 1 and "norm" in name:
            p.fill_(1.0)
        elif p.ndim == 1:
            p.normal_(0.0, 0.02, generator=g)
        else:
            p.normal_(0.0, p.shape[1] ** -0.5, generator=g)


def materialize(model: torch.nn.Module, device, dtype) -> torch.nn.Module:
    model = model.to(dtype=dtype).to_empty(device=device)
    init_weights(model, device)
    return model.eval()


def build_ours(cfg, device, dtype, mmdit):
    with torch.device("meta"):
        model = mmdit.QwenImageMMDiT(cfg)
    return materialize(model, device, dtype)


def build_diffusers(cfg, device, dtype):
    from diffusers import QwenImageTransformer2DModel
    from diffusers.utils import logging as diffusers_logging
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    kwargs = dict(
        patch_size=cfg.patch_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        num_layers=cfg.num_layers, attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads, joint_attention_dim=cfg.joint_attention_dim,
        axes_dims_rope=cfg.axes_dims_rope,
    )
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**kwargs)
    diffusers_logging.set_verbosity_error()  # its advice on .to(dtype) is about from_pretrained
    # Its RoPE tables are plain tensors, not buffers: built on meta they would be empty.
    model.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(cfg.axes_dims_rope), scale_rope=True)
    return materialize(model, device, dtype)


def build_comfy(cfg, device, dtype, comfy_path):
    if comfy_path:
        sys.path.insert(0, str(Path(comfy_path).expanduser()))
    if torch.device(device).type == "cpu":  # ComfyUI's --cpu, before its model management looks for CUDA
        from comfy.cli_args import args as comfy_args

        comfy_args.cpu = True
    import comfy.ops
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(
        patch_size=cfg.patch_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        num_layers=cfg.num_layers, attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads, joint_attention_dim=cfg.joint_attention_dim,
        axes_dims_rope=cfg.axes_dims_rope, dtype=dtype, device="meta",
        operations=comfy.ops.disable_weight_init,
    )
    return materialize(model, device, dtype)


def make_runner(name, model, mmdit, cfg, options=None):
    """fn(x, sigma, context) -> latent velocity [B, C, H, W] for each implementation; ``options``:
    our model's RunOptions (its attention backend)."""
    p = cfg.patch_size
    if name in ("ours", COMPILED):
        return lambda x, sigma, context: model(x, sigma, context, options=options)
    if name == "diffusers":
        def run(x, sigma, context):
            tokens, grid = mmdit.pack_latent(x, p)
            out = model(
                hidden_states=tokens, encoder_hidden_states=context, timestep=sigma.to(x.dtype),
                img_shapes=[[(1, *grid)]] * x.shape[0], return_dict=False,
            )[0]
            return mmdit.unpack_tokens(out, grid, p, x.shape[-2:])
        return run

    five_d = [True]  # newer ComfyUI takes [B, C, T, H, W], 0.3.x takes [B, C, H, W]

    def run_comfy(x, sigma, context):
        if five_d[0]:
            try:
                return model(x.unsqueeze(2), sigma, context)[:, :, 0]
            except (ValueError, RuntimeError):
                five_d[0] = False
        return model(x, sigma, context)
    return run_comfy


@contextlib.contextmanager
def compile_context(name, model, args, notes):
    """For the compiled row: our blocks run through torch.compile (inductor) in the body."""
    if name != COMPILED:
        yield
        return
    block_compile = importlib.import_module("qwenimage_pack.core.pipeline.compile")
    settings = block_compile.CompileSettings("inductor", args.compile_mode)
    with block_compile.compiled(model, settings):
        yield
    if block_compile.failure(settings):
        notes.append(f"{COMPILED}: compiling failed ({block_compile.failure(settings)}); its times are eager")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_forward(fn, inputs, device, warmup: int, iters: int) -> tuple[float, torch.Tensor]:
    out = None
    for _ in range(warmup):
        out = fn(*inputs)
    iters = max(1, iters)
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            out = fn(*inputs)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / iters, out
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*inputs)
    return (time.perf_counter() - t0) / iters, out


def make_inputs(cfg, size, batch, text_tokens, device, dtype):
    g = torch.Generator(device=device).manual_seed(size * 10 + batch)
    lat = size // 8
    x = torch.randn(batch, cfg.out_channels, lat, lat, generator=g, device=device).to(dtype)
    context = torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=g, device=device).to(dtype)
    sigma = torch.full((batch,), 0.6, device=device)
    return x, sigma, context


def free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> dict:
    args = parse_args(argv)
    mmdit, attention = import_pack()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    run_options = importlib.import_module("qwenimage_pack.core.layers.run_options")
    ours = run_options.RunOptions(attention=attention.resolve(args.attention))
    if args.attention != "sdpa":
        print(f"our attention backend: {ours.attention}")
    cfg = model_config(args, mmdit)
    shapes = [(s, b) for s in args.sizes for b in args.batches]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {dev_name}, torch {torch.__version__}, {args.dtype}, {cfg.num_layers} layers x "
          f"{cfg.num_attention_heads} heads x {cfg.attention_head_dim}, {args.text_tokens} text tokens")

    times: dict[str, dict] = {}
    outputs: dict[str, dict] = {}
    notes = []
    record = common.Record(args.json, device, dtype=args.dtype, layers=cfg.num_layers, peak_flops=args.peak, sizes=args.sizes,
                           text_tokens=args.text_tokens, floor_target=FLOOR_TARGET, comfy_target=COMFY_TARGET)
    builders = {
        "ours": lambda: build_ours(cfg, device, dtype, mmdit),
        COMPILED: lambda: build_ours(cfg, device, dtype, mmdit),
        "diffusers": lambda: build_diffusers(cfg, device, dtype),
        "comfy": lambda: build_comfy(cfg, device, dtype, args.comfy_path),
    }
    for name in args.models:
        if name not in builders:
            raise SystemExit(f"unknown model {name!r}; expected ours, diffusers, comfy or {COMPILED}")
        try:
            model = builders[name]()
        except Exception as e:  # a missing optional implementation must not stop the others
            notes.append(f"{name}: skipped ({type(e).__name__}: {e})")
            free(device)
            continue
        run = make_runner(name, model, mmdit, cfg, ours)
        times[name], outputs[name] = {}, {}
        with torch.inference_mode(), compile_context(name, model, args, notes):
            for size, batch in shapes:
                inputs = make_inputs(cfg, size, batch, args.text_tokens, device, dtype)
                try:
                    if name == COMPILED:  # compiling (a new graph only for batch 1 -> 2) is not timed
                        first = time.perf_counter()
                        run(*inputs)
                        sync(device)
                        print(f"  {name} {size}^2 batch {batch}: first call {time.perf_counter() - first:.1f} s")
                    common.reset_peak(device)
                    seconds, out = time_forward(run, inputs, device, args.warmup, args.iters)
                except (torch.OutOfMemoryError, MemoryError) as e:
                    notes.append(f"{name} {size}^2 b{batch}: out of memory ({e})")
                    record.put(f"{name} {size}^2 b{batch}", error=f"out of memory: {e}")
                    free(device)
                    continue
                times[name][(size, batch)] = seconds
                outputs[name][(size, batch)] = out.float().cpu()
                floor = flop_count(cfg, (size // 8 // cfg.patch_size) ** 2, args.text_tokens, batch) / args.peak
                record.put(f"{name} {size}^2 b{batch}", model=name, size=size, batch=batch, s=seconds, floor_s=floor,
                           vs_floor=seconds / floor, peak=common.peak_bytes(device))
                if name == "ours" and (size, batch) == shapes[0]:  # the one the targets are about, profiled whenever asked
                    record.put(f"{name} {size}^2 b{batch}", profile=common.profile_miss(
                        args, f"mmdit_ours_{size}_b{batch}", lambda: run(*inputs), device,
                        f"our {args.dtype} MMDiT forward {size}^2 batch {batch}: {seconds / floor:.2f}x the FLOP floor "
                        f"(target <= {FLOOR_TARGET}x; and <= {COMFY_TARGET}x ComfyUI's native model)"))
                print(f"  {name:9s} {size}^2 batch {batch}: {seconds * 1000:.1f} ms", flush=True)
                del inputs, out
        del model, run
        free(device)

    for note in notes:
        print(note)
    record.set(notes=notes)
    if "ours" in outputs:
        for name in outputs:
            if name == "ours":
                continue
            for key, out in outputs[name].items():
                ref = outputs["ours"].get(key)
                if ref is not None:
                    rel = float((ref - out).norm() / out.norm().clamp_min(1e-30))
                    print(f"output agreement ours vs {name} {key[0]}^2 b{key[1]}: rel. error {rel:.2e}")

    def cell(name, key, floor):
        t = times.get(name, {}).get(key)
        return "-" if t is None else f"{t * 1000:8.4g} ms ({t / floor:.3g}x)"

    header = ["shape", "floor", "ours", "diffusers", "comfy"] + ([COMPILED] if COMPILED in times else [])
    rows = []
    for size, batch in shapes:
        lat = size // 8
        n_img = (lat // cfg.patch_size) ** 2
        floor = flop_count(cfg, n_img, args.text_tokens, batch) / args.peak
        key = (size, batch)
        rows.append([f"{size}^2 b{batch} ({n_img} tok)", f"{floor * 1000:.4g} ms",
                     *(cell(name, key, floor) for name in header[2:])])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print(f"\nFLOP floor at {args.peak:.3g} FLOP/s; ratios are time / floor")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    return times


if __name__ == "__main__":
    main()
