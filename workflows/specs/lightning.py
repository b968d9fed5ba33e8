"""Lightning: the 8-step LoRA at cfg 1 with the constant shift of 3 it was distilled with."""
from build import Node
from t2i import T2I_PROMPT, speed_nodes

LIGHTNING = "Qwen-Image-Lightning-8steps-V1.0.safetensors"
MODELS = {
    LIGHTNING: (f"https://huggingface.co/lightx2v/Qwen-Image-Lightning/resolve/main/{LIGHTNING}", "loras"),
    "Qwen-Image-Lightning-4steps-V1.0.safetensors": (
        "https://huggingface.co/lightx2v/Qwen-Image-Lightning/resolve/main/Qwen-Image-Lightning-4steps-V1.0.safetensors", "loras"),
}
OUTPUTS = {"QwenImageLoraLoader": [("model", "QWENIMAGE_MODEL")]}

NOTE = """## Qwen-Image Lightning (8 steps)

Same files as the text-to-image workflow, plus the LoRA in **models/loras**:
- Qwen-Image-Lightning-8steps-V1.0.safetensors (or the 4-step file: then set steps to 4)

Lightning settings: **cfg 1** (one model pass per step, no negative prompt needed), **shift_mode constant,
shift 3**, 8 steps (4 with the 4-step LoRA). Changing the LoRA strength does not reload the model.

**Faster** (optional): *Speed Options* (fp8_matmul on RTX 40xx / H100) and *Torch Compile* below the loaders are
bypassed; select one and press Ctrl+B to turn it on.
"""


def lightning() -> list[Node]:
    return [
        Node(1, "QwenImageDiTLoader", {"model_name": "qwen_image_fp8_e4m3fn.safetensors", "weight_dtype": "default", "variant": "auto"}, models=["qwen_image_fp8_e4m3fn.safetensors"]),
        Node(11, "QwenImageLoraLoader", {"lora_name": LIGHTNING, "strength": 1.0},
             inputs={"model": (1, 0, "QWENIMAGE_MODEL")}, models=[LIGHTNING]),
        Node(2, "QwenImageTextEncoderLoader", {"text_encoder_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "weight_dtype": "default", "mmproj_name": "none"}, models=["qwen_2.5_vl_7b_fp8_scaled.safetensors"]),
        Node(3, "QwenImageVAELoader", {"vae_name": "qwen_image_vae.safetensors"}, models=["qwen_image_vae.safetensors"]),
        Node(4, "QwenImageTextEncode", {"prompt": T2I_PROMPT}, inputs={"text_encoder": (2, 0, "QWENIMAGE_TEXT_ENCODER")}, size=(420, 200), title="Prompt"),
        Node(6, "QwenImageEmptyLatent", {"width": 1328, "height": 1328, "batch_size": 1, "aspect_ratio": "1:1 (1328x1328)"}),
        Node(7, "QwenImageSampler",
             {"seed": 42, "$control_after_generate": "randomize", "steps": 8, "cfg": 1.0, "shift_mode": "constant", "shift": 3.0,
              "sampler_name": "euler", "denoise": 1.0},
             inputs={"model": (13, 0, "QWENIMAGE_MODEL"), "positive": (4, 0, "CONDITIONING"), "latent_image": (6, 0, "LATENT")}, size=(320, 300)),
        Node(8, "QwenImageVAEDecode", {"tiled": "auto"}, inputs={"vae": (3, 0, "QWENIMAGE_VAE"), "samples": (7, 0, "LATENT")}),
        Node(9, "SaveImage", {"filename_prefix": "qwen-image-lightning"}, inputs={"images": (8, 0, "IMAGE")}, size=(400, 440)),
        Node(10, "MarkdownNote", {"text": NOTE}, size=(400, 360), title="Read me"),
    ] + speed_nodes((11, 0), "auto", ids=(12, 13))


WORKFLOWS = {"qwen_image_lightning_8steps": lightning}
