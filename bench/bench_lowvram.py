#!/usr/bin/env python
"""Seconds per sampling step of the 20 B MMDiT with the GPU capped at 24 / 16 / 12 / 8 GB.

Target (issue "Speed and memory", Low VRAM): a 1328^2 generation completes with the bf16 / fp8 /
Q8_0 / Q4_K models at each cap, streaming blocks from pinned host memory (quantized weights
moved still quantized, the next block prefetched on a side stream while this one computes).

Per format, one model with random weights is built on the GPU, converted, and moved to host
memory. Per cap (``torch.cuda.set_per_process_memory_fraction``): the non-block layers go to the
GPU; as many leading blocks as fit next to the streaming window and ``--headroom-gb`` of
activations stay resident (``streaming.blocks_that_fit``); the rest stream through
``streaming.BlockStreamer``. A step is one forward at batch 2 (cond + uncond of true CFG).

    python bench/bench_lowvram.py
    python bench/bench_lowvram.py --caps 8 --formats Q4_K,fp8 --prefetch 2
    python bench/bench_lowvram.py --smoke
"""
from __future__ import annotations

try:
    from . import common, simple_streamer
except ImportError:  # run as a script
    import common
    import simple_streamer

import torch


def parse_args(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--size", type=int, default=None, help="square image size in pixels (default 1328)")
    p.add_argument("--batch", type=int, default=2, help="2 = cond + uncond of true CFG in one pass")
    p.add_argument("--caps", default=None, help="GiB, comma separated (default 24,16,12,8)")
    p.add_argument("--formats", default=None, help="default bf16,fp8,Q8_0,Q4_K (smoke: bf16,Q4_K)")
    p.add_argument("--headroom-gb", type=float, default=None, help="kept free for activations (default 3)")
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--simple", action="store_true",
                   help="stream with bench/simple_streamer.py (no prefetch, nothing kept) for comparison")
    args = common.finish_args(p.parse_args(argv), warmup=1, iters=2)
    args.size = args.size or (64 if args.smoke else 1328)
    # Smoke: caps in GiB small enough that the tiny model streams.
    args.caps = [float(c) for c in (args.caps or ("0.004,0.001" if args.smoke else "24,16,12,8")).split(",")]
    args.headroom_gb = args.headroom_gb if args.headroom_gb is not None else (0.0 if args.smoke else 3.0)
    formats = args.formats or ("bf16,Q4_K" if args.smoke else "bf16,fp8,Q8_0,Q4_K")
    args.formats = [f.strip() for f in formats.split(",") if f.strip()]
    return args


def build(cfg, fmt: str, device):
    """The model in ``fmt`` with every weight in host memory."""
    model = common.build_mmdit(cfg, device)
    if fmt == "fp8":
        common.to_fp8(model)
    elif fmt != "bf16":
        common.to_gguf(model, fmt)
    model.to("cpu")
    common.free(device)
    return model


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args.device
    streaming = common.pack("core.pipeline.streaming")
    fp8_matmul = common.pack("core.quant.fp8_matmul")
    RunOptions = common.pack("core.layers.run_options").RunOptions
    print(common.environment(device))
    cfg = common.mmdit_config(args.smoke)
    inputs_cpu = common.mmdit_inputs(cfg, args.size, args.batch, args.text_tokens, "cpu")
    rows, results = [], {}
    fp8_fast = fp8_matmul.device_supports(device) and device.type == "cuda"
    for fmt in args.formats:
        model = build(cfg, fmt, device)
        blocks = model.transformer_blocks
        total = common.module_bytes(model)
        block_total = common.module_bytes(blocks)
        head = [m for m in model.children() if m is not blocks]
        head_bytes = total - block_total
        options = RunOptions(fp8_matmul="auto" if fmt == "fp8" and fp8_fast else None)
        for cap in args.caps:
            budget = int((cap - args.headroom_gb) * common.GIB) - head_bytes
            keep = 0 if args.simple else streaming.blocks_that_fit(blocks, budget, prefetch=args.prefetch)
            streamed = sum(streaming.block_bytes(b) for b in list(blocks)[keep:])
            cell = [fmt, f"{cap:g} GiB", f"{total / common.GIB:.1f} GiB", f"{keep}/{len(blocks)}"]
            try:
                with common.memory_cap(device, cap):
                    for m in head:
                        m.to(device)
                    inputs = tuple(t.to(device) for t in inputs_cpu)
                    streamer = (simple_streamer.BlockStreamer(blocks, device, "cpu") if args.simple else
                                streaming.BlockStreamer(blocks, device, "cpu", prefetch=args.prefetch, keep=keep))
                    with streamer:
                        def step():
                            with torch.inference_mode():
                                return model(*inputs, options=options)
                        seconds, out = common.time_fn(step, device, args.warmup, args.iters)
                        finite = bool(torch.isfinite(out).all())
                        del out
                    peak = common.peak_bytes(device)
                    del inputs
            except (torch.OutOfMemoryError, MemoryError) as e:
                rows.append(cell + ["out of memory", "-", "-", str(e).splitlines()[0][:60]])
                results[(fmt, cap)] = None
                continue
            finally:
                for m in head:
                    m.to("cpu")
                common.free(device)
            rate = f"{streamed / seconds / 1e9:.1f} GB/s" if streamed else "-"
            rows.append(cell + [f"{seconds:.3f} s", common.fmt_gib(peak), rate, "" if finite else "non-finite output"])
            results[(fmt, cap)] = seconds
            print(f"  {fmt} at {cap:g} GiB: {seconds:.3f} s/step, {keep} blocks resident", flush=True)
        del model, blocks, head
        common.free(device)

    common.print_table(
        f"Seconds per step (one forward, batch {args.batch}) at {args.size}^2 under memory caps, "
        f"{'simple streamer (no prefetch)' if args.simple else f'prefetch {args.prefetch}'}{common.smoke_note(args)}",
        ["weights", "cap", "model size", "blocks resident", "s / step", "peak VRAM", "streamed bytes / s", "note"],
        rows,
        notes=([f"fp8 rows use {'float8 matmuls' if fp8_fast else 'dequantized fp8 weights (no float8 tensor cores here)'}"]
               if "fp8" in args.formats else [])
        + ["streamed bytes / s: bytes of the streamed blocks per step over the step time (upper bound of PCIe use)"],
    )
    return results


if __name__ == "__main__":
    main()
