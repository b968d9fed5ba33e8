"""Union control LoRA: DiffSynth's LoRA that follows any control map given as a reference latent
(the official template image_qwen_image_union_control_lora)."""
from build import Node

UNION_LORA = "qwen_image_union_diffsynth_lora.safetensors"
LIGHTNING_4 = "Qwen-Image-Lightning-4steps-V1.0.safetensors"
MODELS = {
    UNION_LORA: ("https://huggingface.co/Comfy-Org/Qwen-Image-DiffSynth-ControlNets/resolve/main/split_files/loras/"
                 f"{UNION_LORA}", "loras"),
}
OUTPUTS = {
    "QwenImageControlReference": [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")],
    "ImageScaleToMaxDimension": [("IMAGE", "IMAGE")],
}

PROMPT = (
    "Extreme close-up, realistic digital illustration of a girl with curly white hair and closed eyes, a huge black "
    "flower with yellow stamens behind her, black turtleneck, dark green backdrop, thick oil-painting brushstrokes, "
    "soft light and strong contrast, dreamy and elegant."
)

NOTE = f"""## Qwen-Image union control LoRA

**Files**: {UNION_LORA} in **models/loras**, plus the text-to-image files (diffusion model, text encoder, VAE).

One LoRA follows any control map: canny edges (below), depth, pose, lineart, soft edge. The map goes into the
model as a **reference latent** through *Qwen-Image Control Reference* (on both prompts; the map also sets the
output size), not through a ControlNet. Without a control image the LoRA stops with a message saying what to
connect.

*ImageScaleToMaxDimension* brings the map to Qwen-Image's size (longest side 1328); replace *Canny* by any
preprocessor, or load a ready-made map and remove it.

**Settings** (official template): 20 steps, cfg 2.5, shift_mode constant, shift 3.1. Faster: add the
Lightning 4-step LoRA ({LIGHTNING_4}) after the union LoRA, then 4 steps, cfg 1.
"""


def union_control_lora() -> list[Node]:
    return [
        Node(1, "QwenImageDiTLoader", {"model_name": "qwen_image_fp8_e4m3fn.safetensors", "weight_dtype": "default", "variant": "auto"}, models=["qwen_image_fp8_e4m3fn.safetensors"]),
        Node(11, "QwenImageLoraLoader", {"lora_name": UNION_LORA, "strength": 1.0},
             inputs={"model": (1, 0, "QWENIMAGE_MODEL")}, models=[UNION_LORA], group="LoRA (union control)"),
        Node(2, "QwenImageTextEncoderLoader", {"text_encoder_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "weight_dtype": "default", "mmproj_name": "none"}, models=["qwen_2.5_vl_7b_fp8_scaled.safetensors"]),
        Node(3, "QwenImageVAELoader", {"vae_name": "qwen_image_vae.safetensors"}, models=["qwen_image_vae.safetensors"]),
        Node(5, "LoadImage", {"image": "example.png"}, size=(320, 360), column=2, group="Step 4 - Control image"),
        Node(12, "ImageScaleToMaxDimension", {"upscale_method": "lanczos", "largest_size": 1328},
             inputs={"image": (5, 0, "IMAGE")}, column=2, group="Step 4 - Control image"),
        Node(8, "Canny", {"low_threshold": 0.26, "high_threshold": 0.35}, inputs={"image": (12, 0, "IMAGE")}),
        Node(9, "PreviewImage", {}, inputs={"images": (8, 0, "IMAGE")}, size=(320, 320)),
        Node(6, "QwenImageTextEncode", {"prompt": PROMPT}, inputs={"text_encoder": (2, 0, "QWENIMAGE_TEXT_ENCODER")}, size=(420, 200), title="Positive prompt"),
        Node(7, "QwenImageTextEncode", {"prompt": " "}, inputs={"text_encoder": (2, 0, "QWENIMAGE_TEXT_ENCODER")}, size=(420, 120), title="Negative prompt"),
        Node(10, "QwenImageControlReference", {},
             inputs={"positive": (6, 0, "CONDITIONING"), "negative": (7, 0, "CONDITIONING"), "vae": (3, 0, "QWENIMAGE_VAE"),
                     "image": (8, 0, "IMAGE")}, size=(320, 140)),
        Node(13, "QwenImageSampler",
             {"seed": 42, "$control_after_generate": "randomize", "steps": 20, "cfg": 2.5, "shift_mode": "constant", "shift": 3.1,
              "sampler_name": "euler", "denoise": 1.0},
             inputs={"model": (11, 0, "QWENIMAGE_MODEL"), "positive": (10, 0, "CONDITIONING"), "latent_image": (10, 2, "LATENT"),
                     "negative": (10, 1, "CONDITIONING")}, size=(320, 300)),
        Node(14, "QwenImageVAEDecode", {"tiled": "auto"}, inputs={"vae": (3, 0, "QWENIMAGE_VAE"), "samples": (13, 0, "LATENT")}),
        Node(15, "SaveImage", {"filename_prefix": "qwen-image-union-control"}, inputs={"images": (14, 0, "IMAGE")}, size=(400, 440)),
        Node(16, "MarkdownNote", {"text": NOTE}, size=(420, 460), title="Read me"),
    ]


WORKFLOWS = {"qwen_image_union_control_lora": union_control_lora}
