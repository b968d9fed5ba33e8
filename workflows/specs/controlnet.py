"""ControlNets: InstantX Union with a canny map, the InstantX inpainting ControlNet, a DiffSynth patch."""
from build import Node, loaders

CN_HF = "https://huggingface.co/Comfy-Org/Qwen-Image-InstantX-ControlNets/resolve/main/split_files/controlnet"
PATCH_HF = "https://huggingface.co/Comfy-Org/Qwen-Image-DiffSynth-ControlNets/resolve/main/split_files/model_patches"
UNION = "Qwen-Image-InstantX-ControlNet-Union.safetensors"
INPAINT = "Qwen-Image-InstantX-ControlNet-Inpainting.safetensors"
CANNY_PATCH = "qwen_image_canny_diffsynth_controlnet.safetensors"

MODELS = {
    UNION: (f"{CN_HF}/{UNION}", "controlnet"),
    INPAINT: (f"{CN_HF}/{INPAINT}", "controlnet"),
    CANNY_PATCH: (f"{PATCH_HF}/{CANNY_PATCH}", "model_patches"),
}

OUTPUTS = {
    "QwenImageControlNetLoader": [("controlnet", "QWENIMAGE_CONTROLNET")],
    "QwenImageControlNetApply": [("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
    "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    "Canny": [("IMAGE", "IMAGE")],
    "PreviewImage": [],
}

CANNY_PROMPT = (
    "A weathered lighthouse on a rocky cliff at sunset, waves crashing below, seagulls, warm golden light, "
    "highly detailed photograph."
)
INPAINT_PROMPT = "A vase of bright sunflowers on the table, soft window light, photorealistic."

FILES = """| folder | file |
|---|---|
| models/diffusion_models | qwen_image_fp8_e4m3fn.safetensors (or bf16, or a GGUF) |
| models/text_encoders | qwen_2.5_vl_7b_fp8_scaled.safetensors |
| models/vae | qwen_image_vae.safetensors |
"""

SIZE_RULE = (
    "The control image is centre-cropped to the latent's aspect ratio and resized to its size (never stretched): "
    "set the Empty Latent to your image's aspect ratio to keep all of it."
)

UNION_NOTE = f"""## Qwen-Image ControlNet Union (canny)

**Files**: {UNION} in **models/controlnet**, plus

{FILES}
Load a photo or drawing; the core **Canny** node turns it into an edge map (any preprocessor works: depth,
pose, soft edge, lineart). Strength 1.0 follows the map closely; lower it (0.6-0.9) or end the control early
(end_percent 0.8) for more freedom. {SIZE_RULE}

Chain several Apply ControlNet nodes to combine controls. 30 steps, cfg 4 (InstantX's recommendation).
"""

INPAINT_NOTE = f"""## Qwen-Image inpainting ControlNet

**Files**: {INPAINT} in **models/controlnet**, plus

{FILES}
Right-click the Load Image node, *Open in MaskEditor*, paint the area to repaint, save. The painted area
(mask = 1) is regenerated from the prompt; the rest guides the picture. Set the Empty Latent to the image's
size. {SIZE_RULE}
"""

PATCH_NOTE = f"""## Qwen-Image DiffSynth ControlNet patch (canny)

**Files**: {CANNY_PATCH} in **models/model_patches** (depth and inpaint patches work the same way), plus

{FILES}
DiffSynth patches are lighter than the InstantX ControlNet (a small block after each of the 60 model blocks).
The inpaint patch also takes a mask. {SIZE_RULE}
"""


def _graph(cn_file: str, prompt: str, note: str, canny: bool, mask: bool, steps: int, size=(1328, 1328)) -> list[Node]:
    nodes = loaders("qwen_image_fp8_e4m3fn.safetensors")
    nodes += [
        Node(4, "QwenImageControlNetLoader", {"controlnet_name": cn_file, "weight_dtype": "default"}, models=[cn_file]),
        Node(5, "LoadImage", {"image": "example.png"}, size=(320, 360), column=2,
             group="Step 4 - Image and mask" if mask else "Step 4 - Control image"),
        Node(6, "QwenImageTextEncode", {"prompt": prompt}, inputs={"text_encoder": (2, 0, "QWENIMAGE_TEXT_ENCODER")}, size=(420, 200), title="Positive prompt"),
        Node(7, "QwenImageTextEncode", {"prompt": " "}, inputs={"text_encoder": (2, 0, "QWENIMAGE_TEXT_ENCODER")}, size=(420, 120), title="Negative prompt"),
    ]
    image_src = (5, 0, "IMAGE")
    if canny:
        nodes += [
            Node(8, "Canny", {"low_threshold": 0.1, "high_threshold": 0.2}, inputs={"image": (5, 0, "IMAGE")}),
            Node(9, "PreviewImage", {}, inputs={"images": (8, 0, "IMAGE")}, size=(320, 320)),
        ]
        image_src = (8, 0, "IMAGE")
    apply_inputs = {
        "positive": (6, 0, "CONDITIONING"), "negative": (7, 0, "CONDITIONING"), "controlnet": (4, 0, "QWENIMAGE_CONTROLNET"),
        "vae": (3, 0, "QWENIMAGE_VAE"), "image": image_src,
    }
    if mask:
        apply_inputs["mask"] = (5, 1, "MASK")
    nodes += [
        Node(10, "QwenImageControlNetApply", {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}, inputs=apply_inputs, size=(320, 200)),
        Node(11, "QwenImageEmptyLatent", {"width": size[0], "height": size[1], "batch_size": 1, "aspect_ratio": "custom"}),
        Node(12, "QwenImageSampler",
             {"seed": 42, "$control_after_generate": "randomize", "steps": steps, "cfg": 4.0, "shift_mode": "dynamic", "shift": 3.0,
              "sampler_name": "euler", "denoise": 1.0},
             inputs={"model": (1, 0, "QWENIMAGE_MODEL"), "positive": (10, 0, "CONDITIONING"), "latent_image": (11, 0, "LATENT"),
                     "negative": (10, 1, "CONDITIONING")}, size=(320, 300)),
        Node(13, "QwenImageVAEDecode", {"tiled": "auto"}, inputs={"vae": (3, 0, "QWENIMAGE_VAE"), "samples": (12, 0, "LATENT")}),
        Node(14, "SaveImage", {"filename_prefix": "qwen-image-controlnet"}, inputs={"images": (13, 0, "IMAGE")}, size=(400, 440)),
        Node(15, "MarkdownNote", {"text": note}, size=(420, 460), title="Read me"),
    ]
    return nodes


def union_canny() -> list[Node]:
    return _graph(UNION, CANNY_PROMPT, UNION_NOTE, canny=True, mask=False, steps=30)


def inpaint() -> list[Node]:
    return _graph(INPAINT, INPAINT_PROMPT, INPAINT_NOTE, canny=False, mask=True, steps=30, size=(1024, 1024))


def diffsynth_canny() -> list[Node]:
    return _graph(CANNY_PATCH, CANNY_PROMPT, PATCH_NOTE, canny=True, mask=False, steps=30)


WORKFLOWS = {
    "qwen_image_controlnet_union_canny": union_canny,
    "qwen_image_controlnet_inpaint": inpaint,
    "qwen_image_controlnet_diffsynth_canny": diffsynth_canny,
}
