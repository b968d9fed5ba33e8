#!/usr/bin/env python
"""fp8 MMDiT forward: float8 tensor-core matmuls vs our bf16, and accuracy on the same weights.

Target (issue "Speed and memory"): an fp8 checkpoint's forward <= 0.75x our bf16 forward on
Hopper / Ada, with correct scales (ComfyUI's fp8 "fast" mode corrupts images), accuracy checked
against bf16 on the same weights.

One bf16 model with random weights is timed; its block weights are then stored as
float8_e4m3fn with per-tensor scales (what ``weight_dtype=fp8_e4m3fn`` or an fp8 checkpoint
gives), and the same forward runs (a) dequantizing each weight to bf16 (the exact default path),
(b) on float8 matmuls with per-row activation scales, (c) with per-tensor activation scales.
Accuracy is each output against the bf16 output: (a) shows the error of storing weights in fp8,
(b)/(c) add the activation quantization on top.

    python bench/bench_fp8_forward.py                    # 1328^2 batch 1 and 2
    python bench/bench_fp8_forward.py --smoke            # tiny, CPU (float8 matmul emulated by torch)
"""
from __future__ import annotations

try:
    from . import common
except ImportError:  # run as a script
    import common

import torch

TARGET = 0.75


def parse_args(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--size", type=int, default=None, help="square image size in pixels (default 1328)")
    p.add_argument("--batches", default=None, help="default 1,2 (smoke: 1)")
    args = common.finish_args(p.parse_args(argv), warmup=3, iters=10)
    args.size = args.size or (64 if args.smoke else 1328)
    args.batches = [int(b) for b in (args.batches or ("1" if args.smoke else "1,2")).split(",")]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args.device
    fp8_matmul = common.pack("core.quant.fp8_matmul")
    RunOptions = common.pack("core.layers.run_options").RunOptions
    print(common.environment(device))
    cfg = common.mmdit_config(args.smoke)
    model = common.build_mmdit(cfg, device)
    inputs = {b: common.mmdit_inputs(cfg, args.size, b, args.text_tokens, device) for b in args.batches}
    options = {"run": RunOptions(fp8_matmul=None)}  # the rows' float8 setting, passed with each forward

    def forward(batch):
        def run():
            with torch.inference_mode():
                return model(*inputs[batch], options=options["run"])
        return run

    def timed(batch):
        return common.time_fn(forward(batch), device, args.warmup, args.iters)

    record = common.Record(args.json, device, size=args.size, layers=cfg.num_layers, target=TARGET)
    results: dict[tuple, dict] = {}

    def measure(label, b):
        common.reset_peak(device)
        s, out = timed(b)
        results[(label, b)] = {"s": s, "out": out.float().cpu(), "peak": common.peak_bytes(device)}
        base = results[("bf16", b)]
        ratio = s / base["s"]
        missed = label.startswith("fp8 matmul") and ratio > TARGET
        profile = common.profile_miss(args, f"fp8_{label.split(', ')[-1].replace(' ', '_')}_b{b}", forward(b),
                                      device, f"{label}, batch {b}: {ratio:.2f}x bf16 (target <= {TARGET}x)") \
            if missed else None
        record.put(f"{label} b{b}", s=s, ratio=ratio, peak=results[(label, b)]["peak"], profile=profile,
                   target=TARGET if label.startswith("fp8 matmul") else None,
                   rel_err=None if label == "bf16" else common.rel_err(results[(label, b)]["out"], base["out"]))

    for b in args.batches:
        measure("bf16", b)
    common.to_fp8(model)
    common.free(device)
    supported = fp8_matmul.device_supports(device) or args.smoke
    modes = [("fp8 weights, dequantized", None)]
    if supported:
        modes += [("fp8 matmul, row scales", "row"), ("fp8 matmul, tensor scales", "tensor")]
    for label, mode in modes:
        options["run"] = RunOptions(fp8_matmul=mode, fp8_on_cpu=args.smoke)
        for b in args.batches:
            measure(label, b)
        print(f"  {label}: done", flush=True)

    rows = []
    for b in args.batches:
        ref = results[("bf16", b)]
        for label in ["bf16"] + [m[0] for m in modes]:
            r = results[(label, b)]
            ratio = r["s"] / ref["s"]
            target = "-"
            if label.startswith("fp8 matmul"):
                target = f"<= {TARGET}x {'ok' if ratio <= TARGET else 'MISSED'}"
            acc = "-" if label == "bf16" else f"{common.rel_err(r['out'], ref['out']):.3e} / {common.cos_sim(r['out'], ref['out']):.5f}"
            rows.append([f"{args.size}^2 b{b}", label, common.fmt_ms(r["s"]), f"{ratio:.2f}x", target, acc])
    notes = []
    if not supported:
        record.set(note="no float8 tensor cores")
        notes.append(f"{device}: no float8 tensor cores (needs compute capability 8.9+); float8 matmul rows skipped")
    notes.append("accuracy: rel. L2 error / cosine similarity of the velocity against bf16 on the same weights")
    common.print_table(
        f"fp8 vs bf16 MMDiT forward, {cfg.num_layers} layers, {args.text_tokens} text tokens{common.smoke_note(args)}",
        ["shape", "weights / matmul", "forward", "vs bf16", "target", "rel. err / cos vs bf16"], rows, notes,
    )
    return {k: v["s"] for k, v in results.items()}


if __name__ == "__main__":
    main()
