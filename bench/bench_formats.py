#!/usr/bin/env python
"""Compact weight formats vs our bf16 forward: ComfyUI's nvfp4 / mxfp8 / int8 layers and DFloat11.

Target (issue 15): a DFloat11 model's 1328^2 forward <= 1.15x our bf16 forward. The ComfyUI
formats have no target yet: their rows are information (time, accuracy against bf16).

One bf16 MMDiT with random weights (full width, ``--layers`` blocks) is timed. For each ComfyUI
format its block Linears are quantized with comfy-kitchen (the library ComfyUI writes these files
with) and kept as stored, decoded in the layer each forward; int8 also runs on int8 tensor cores.

DFloat11: the package's encoder is pure Python (about 2 M values/s), far too slow to compress a
full-size block (340 M values) inside the check's time. The row therefore measures our decoder's
throughput on a compressed sample of the model's own block weights (``--df11-values``) and adds,
for every block, the time to decode that block's weights at that throughput to the bf16 forward:
an estimate built from two measurements, reported as such.

    python bench/bench_formats.py                 # 1328^2, 2 full-width blocks
    python bench/bench_formats.py --smoke         # tiny, CPU
"""
from __future__ import annotations

try:
    from . import common
except ImportError:  # run as a script
    import common

import contextlib
import importlib.util
import io
import sys
import warnings
from pathlib import Path

import torch

DF11_TARGET = 1.15
FORMATS = {  # name: (comfy_quant JSON, kitchen layout, its arguments)
    "nvfp4": ({"format": "nvfp4"}, "TensorCoreNVFP4Layout", {}),
    "mxfp8": ({"format": "mxfp8"}, "TensorCoreMXFP8Layout", {}),
    "int8_convrot": ({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256},
                     "TensorWiseINT8Layout", {"per_channel": True, "convrot": True, "convrot_groupsize": 256}),
}
# The order DFloat11's Qwen-Image files concatenate a block's weights in (config.json pattern_dict).
DF11_PATTERN = ("img_mod.1", "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_k_proj", "attn.add_v_proj",
                "attn.add_q_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                "txt_mod.1", "txt_mlp.net.0.proj", "txt_mlp.net.2")


def parse_args(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--size", type=int, default=None, help="square image size in pixels (default 1328)")
    p.add_argument("--layers", type=int, default=None, help="full-width blocks (default 2)")
    p.add_argument("--df11-values", type=int, default=None, help="values in the DFloat11 sample (default 8 M)")
    args = common.finish_args(p.parse_args(argv), warmup=2, iters=5)
    args.size = args.size or (64 if args.smoke else 1328)
    args.layers = args.layers or 2
    args.df11_values = args.df11_values or (1 << 16 if args.smoke else 8 << 20)
    return args


def kitchen():
    try:
        import comfy_kitchen.tensor as ck_tensor
    except ImportError:
        return None
    return ck_tensor


def df11_encoder():
    """The dfloat11 package's encoder module, loaded by path: its package __init__ imports cupy."""
    spec = importlib.util.find_spec("dfloat11")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "dfloat11_utils.py"
    spec = importlib.util.spec_from_file_location("dfloat11_utils_for_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except ImportError:  # its own imports (dahuffman, tqdm) missing
        return None
    return module


@torch.no_grad()
def to_comfy_format(model, fmt: str, ck_tensor, device) -> None:
    """Every block Linear -> ``fmt`` as ComfyUI stores it (quantized by kitchen's eager code, on the device)."""
    comfy_quant = common.pack("core.quant.comfy_quant")
    conf, layout, kw = FORMATS[fmt]
    quant = comfy_quant.parse_layer_config(conf)
    for _, lin in common.block_linears(model):
        qt = ck_tensor.QuantizedTensor.from_float(lin.weight.detach().float(), layout, **kw)
        stored = qt.state_dict("weight")
        side = {k: (v.view(torch.uint8) if "e8m0" in str(v.dtype) else v).to(device)
                for k, v in stored.items() if k in comfy_quant.SIDE_TENSORS[quant.format]}
        lin.set_comfy_quant(stored["weight"].to(device), side, quant, (lin.out_features, lin.in_features))


def df11_sample(model, values: int, encoder, device):
    """(DF11Group of the first ``values`` of block 0's weights in pattern order, the original values)."""
    df11 = common.pack("core.quant.dfloat11")
    block = model.transformer_blocks[0]
    flat = torch.cat([block.get_submodule(n).weight.detach().flatten().cpu() for n in DF11_PATTERN])[:values]
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, counter = encoder.get_codec(flat)
        codec, _, table = encoder.get_32bit_codec(counter)
        luts = encoder.get_luts(table)
        stream, sign_mantissa, positions, gaps, split = encoder.encode_weights([flat], codec, 8, 512)
    tensors = dict(luts=luts, encoded_exponent=stream, sign_mantissa=sign_mantissa,
                   output_positions=positions.view(torch.uint8), gaps=gaps, split_positions=split)
    return df11.DF11Group(tensors, [("sample", tuple(flat.shape))]).to(device), flat


def block_values(model) -> int:
    block = model.transformer_blocks[0]
    return sum(block.get_submodule(n).weight.numel() for n in DF11_PATTERN)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args.device
    RunOptions = common.pack("core.layers.run_options").RunOptions
    blockscaled_matmul = common.pack("core.quant.blockscaled_matmul")
    print(common.environment(device))
    cfg = common.mmdit_config(args.smoke, layers=args.layers)
    inputs = common.mmdit_inputs(cfg, args.size, 1, args.text_tokens, device)
    record = common.Record(args.json, device, size=args.size, layers=cfg.num_layers, target=DF11_TARGET)
    cpu = torch.device(device).type == "cpu"

    def timed(model, options=None):
        def run():
            with torch.inference_mode():
                return model(*inputs, options=options)
        common.reset_peak(device)
        s, out = common.time_fn(run, device, args.warmup, args.iters)
        return s, out.float().cpu(), common.peak_bytes(device), run

    model = common.build_mmdit(cfg, device)
    base_s, base_out, base_peak, _ = timed(model)
    record.put("bf16", s=base_s, ratio=1.0, peak=base_peak)
    rows = [["bf16 (reference)", common.fmt_ms(base_s), "1.00x", "-", common.fmt_gib(base_peak), "-"]]

    ck_tensor = kitchen()
    for fmt in FORMATS:
        if ck_tensor is None:
            rows.append([fmt, "-", "-", "-", "-", "not measured: comfy-kitchen missing"])
            continue
        quantized = common.build_mmdit(cfg, device)  # the same weights: initialised by name
        to_comfy_format(quantized, fmt, ck_tensor, device)
        variants = [(fmt, None)]
        if fmt.startswith("int8"):
            variants.append((f"{fmt}, int8 tensor cores", RunOptions(int8_matmul=True, int8_on_cpu=cpu)))
        if fmt in blockscaled_matmul.FORMATS and (cpu or blockscaled_matmul.device_supports(device)):
            # Blackwell only (an H100 / H200 has no block-scaled tensor cores: the row is left out);
            # on the CPU the kernel's arithmetic is emulated, which checks the path, not its speed.
            variants.append((f"{fmt}, block-scaled tensor cores{' (emulated)' if cpu else ''}",
                             RunOptions(blockscaled_matmul=True, blockscaled_on_cpu=cpu)))
        for label, options in variants:
            s, out, peak, _ = timed(quantized, options)
            err = common.rel_err(out, base_out)
            record.put(label, s=s, ratio=s / base_s, peak=peak, rel_err=err)
            rows.append([label, common.fmt_ms(s), f"{s / base_s:.2f}x", f"{err:.2e}", common.fmt_gib(peak), "info"])
        del quantized
        common.free(device)

    encoder = df11_encoder()
    if encoder is None:
        rows.append(["DFloat11 (estimated)", "-", "-", "-", "-", "not measured: dfloat11 / dahuffman missing"])
    else:
        group, flat = df11_sample(model, args.df11_values, encoder, device)
        decoded = group.decode(compiled=not cpu)[0]
        exact = torch.equal(decoded.cpu().view(torch.int16), flat.view(torch.int16))
        dec_s, _ = common.time_fn(lambda: group.decode(compiled=not cpu), device, 1, args.iters)
        per_value = dec_s / flat.numel()
        est_s = base_s + cfg.num_layers * block_values(model) * per_value
        ratio = est_s / base_s
        record.put("DFloat11", s=est_s, ratio=ratio, target=DF11_TARGET, exact=exact,
                   decode_values_per_s=1 / per_value, sample_values=flat.numel())
        rows.append(["DFloat11 (estimated: bf16 + decode at measured rate)", common.fmt_ms(est_s), f"{ratio:.2f}x",
                     "0 (bit-exact)" if exact else "NOT EXACT", "-",
                     f"<= {DF11_TARGET}x {'ok' if ratio <= DF11_TARGET and exact else 'MISSED'}"])

    common.print_table(
        f"Compact formats: MMDiT forward, {args.size}^2 batch 1, {cfg.num_layers} layers{common.smoke_note(args)}",
        ["format", "time", "vs bf16", "rel. err vs bf16", "peak", "target"], rows,
        notes=[f"DFloat11: decoder throughput measured on {args.df11_values / 2**20:.1f} M of block 0's values, "
               "applied to every block's 14 compressed weights"],
    )
    return record.data


if __name__ == "__main__":
    main()
