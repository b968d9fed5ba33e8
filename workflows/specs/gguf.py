"""GGUF: a Q4_K_M diffusion model (13 GB) for 12-16 GB GPUs, kept quantized in memory."""
from build import Node
from t2i import T2I_PROMPT

GGUF = "qwen-image-Q4_K_M.gguf"
MODELS = {GGUF: (f"https://huggingface.co/city96/Qwen-Image-gguf/resolve/main/{GGUF}", "diffusion_models")}

NOTE = """## Qwen-Image from GGUF

Put a GGUF diffusion model in **models/diffusion_models** (or unet): qwen-image-Q4_K_M.gguf (13 GB), Q8_0 (22 GB),
Q4_0, Q5_K_M, ... Weights stay quantized in memory and are dequantized on the GPU inside each layer.
The text encoder may also be a GGUF (Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf in models/text_encoders); its vision tower
(for edit) is the separate mmproj file, chosen in the loader's mmproj_name.
Settings as in the text-to-image workflow: 50 steps, cfg 4, shift_mode dynamic.
"""


def gguf() -> list[Node]:
    return [
        Node(1, "QwenImageDiTLoader", {"model_name": GGUF, "weight_dtype": "default", "variant": "auto"}, pos=(20, 40), models=[GGUF]),
        Node(2, "QwenImageTextEncoderLoader", {"text_encoder_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "weight_dtype": "default", "mmproj_name": "none"},
             pos=(20, 200), models=["qwen_2.5_vl_7b_fp8_scaled.safetensors"]),
        Node(3, "QwenImageVAELoader", {"vae_name": "qwen_image_vae.safetensors"}, pos=(20, 360), models=["qwen_image_vae.safetensors"]),
        Node(4, "QwenImageTextEncode", {"prompt": T2I_PROMPT}, inputs={"text_encoder": (2, 0, "QWENIMAGE_TEXT_ENCODER")},
             pos=(380, 40), size=(420, 200), title="Positive prompt"),
        Node(5, "QwenImageTextEncode", {"prompt": " "}, inputs={"text_encoder": (2, 0, "QWENIMAGE_TEXT_ENCODER")},
             pos=(380, 280), size=(420, 120), title="Negative prompt"),
        Node(6, "QwenImageEmptyLatent", {"width": 1328, "height": 1328, "batch_size": 1, "aspect_ratio": "1:1 (1328x1328)"}, pos=(380, 440)),
        Node(7, "QwenImageSampler",
             {"seed": 42, "$control_after_generate": "randomize", "steps": 50, "cfg": 4.0, "shift_mode": "dynamic", "shift": 3.0,
              "sampler_name": "euler", "denoise": 1.0},
             inputs={"model": (1, 0, "QWENIMAGE_MODEL"), "positive": (4, 0, "CONDITIONING"), "latent_image": (6, 0, "LATENT"),
                     "negative": (5, 0, "CONDITIONING")},
             pos=(840, 40), size=(320, 300)),
        Node(8, "QwenImageVAEDecode", {"tiled": "auto"}, inputs={"vae": (3, 0, "QWENIMAGE_VAE"), "samples": (7, 0, "LATENT")}, pos=(1200, 40)),
        Node(9, "SaveImage", {"filename_prefix": "qwen-image-gguf"}, inputs={"images": (8, 0, "IMAGE")}, pos=(1200, 200), size=(400, 440)),
        Node(10, "MarkdownNote", {"text": NOTE}, pos=(-420, 40), size=(400, 320), title="Read me"),
    ]


WORKFLOWS = {"qwen_image_gguf": gguf}
