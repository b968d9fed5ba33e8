"""Qwen-Image-2512 with alibaba-pai's Fun ControlNet Union (the official template image_qwen_Image_2512_controlnet)."""
from build import Node, loaders
from t2i import QWEN_2512

FUN = "Qwen-Image-2512-Fun-Controlnet-Union-2602.safetensors"
MODELS = {
    FUN: (f"https://huggingface.co/alibaba-pai/Qwen-Image-2512-Fun-Controlnet-Union/resolve/main/{FUN}", "controlnet"),
}

PROMPT = (
    "A woman with curly hair, wearing orange sunglasses, a white knit sweater with orange accents, and high-waisted "
    "orange trousers, stands confidently against a vibrant, clear blue sky. The photo has a warm, sunlit filter that "
    "amplifies the rich terracotta and burnt orange tones of her outfit, while the cool, deep blue background is "
    "intensified, creating a bold, saturated contrast that feels vivid and cinematic."
)
# The template's negative prompt (low resolution, low quality, deformed limbs and fingers, oversaturated, waxy,
# faces without detail, over-smoothed, an AI look, chaotic composition, blurred or distorted text).
NEGATIVE = "低分辨率，低画质，肢体畸形，手指畸形，画面过饱和，蜡像感，人脸无细节，过度光滑，画面具有AI感。构图混乱。文字模糊，扭曲"

NOTE = f"""## Qwen-Image-2512 Fun ControlNet Union (canny)

**Files**: {FUN} in **models/controlnet**, {QWEN_2512} in **models/diffusion_models**, plus the text encoder
and VAE of the text-to-image workflow.

alibaba-pai's ControlNet for Qwen-Image-2512 takes canny, depth, pose, HED, MLSD or scribble maps: swap *Canny*
for another preprocessor, or load a ready-made map. Strength is the model's own scale (ComfyUI's core Apply
ControlNet uses the square root of its strength: its 0.64 is 0.8 here; 1.0 is the same in both). It is made for
2512 text to image; the Edit models are refused with a message. The control image is centre-cropped to the latent's aspect
ratio and resized to its size (never stretched).

**Settings** (official template): 50 steps, cfg 4, shift_mode constant, shift 3.1. With the Lightning 4-step LoRA:
4 steps, cfg 1.
"""


def fun_controlnet() -> list[Node]:
    return [
        *loaders(QWEN_2512),
        Node(4, "QwenImageControlNetLoader", {"controlnet_name": FUN, "weight_dtype": "default"}, models=[FUN]),
        Node(5, "LoadImage", {"image": "example.png"}, size=(320, 360), column=2, group="Step 4 - Control image"),
        Node(6, "QwenImageTextEncode", {"prompt": PROMPT}, inputs={"text_encoder": (2, 0, "QWENIMAGE_TEXT_ENCODER")}, size=(420, 200), title="Positive prompt"),
        Node(7, "QwenImageTextEncode", {"prompt": NEGATIVE}, inputs={"text_encoder": (2, 0, "QWENIMAGE_TEXT_ENCODER")}, size=(420, 120), title="Negative prompt"),
        Node(8, "Canny", {"low_threshold": 0.33, "high_threshold": 0.35}, inputs={"image": (5, 0, "IMAGE")}),
        Node(9, "PreviewImage", {}, inputs={"images": (8, 0, "IMAGE")}, size=(320, 320)),
        Node(10, "QwenImageControlNetApply", {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0},
             inputs={"positive": (6, 0, "CONDITIONING"), "negative": (7, 0, "CONDITIONING"), "controlnet": (4, 0, "QWENIMAGE_CONTROLNET"),
                     "vae": (3, 0, "QWENIMAGE_VAE"), "image": (8, 0, "IMAGE")}, size=(320, 200)),
        Node(11, "QwenImageEmptyLatent", {"width": 1328, "height": 1328, "batch_size": 1, "aspect_ratio": "1:1 (1328x1328)"}),
        Node(12, "QwenImageSampler",
             {"seed": 42, "$control_after_generate": "randomize", "steps": 50, "cfg": 4.0, "shift_mode": "constant", "shift": 3.1,
              "sampler_name": "euler", "denoise": 1.0},
             inputs={"model": (1, 0, "QWENIMAGE_MODEL"), "positive": (10, 0, "CONDITIONING"), "latent_image": (11, 0, "LATENT"),
                     "negative": (10, 1, "CONDITIONING")}, size=(320, 300)),
        Node(13, "QwenImageVAEDecode", {"tiled": "auto"}, inputs={"vae": (3, 0, "QWENIMAGE_VAE"), "samples": (12, 0, "LATENT")}),
        Node(14, "SaveImage", {"filename_prefix": "qwen-image-2512-fun-controlnet"}, inputs={"images": (13, 0, "IMAGE")}, size=(400, 440)),
        Node(15, "MarkdownNote", {"text": NOTE}, size=(420, 460), title="Read me"),
    ]


WORKFLOWS = {"qwen_image_2512_fun_controlnet": fun_controlnet}
