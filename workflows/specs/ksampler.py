"""Our model through ComfyUI's own sampling nodes, set up as the official Qwen-Image template is
(ModelSamplingAuraFlow shift 3.1, KSampler euler / simple, 20 steps, cfg 2.5)."""
from build import Node, loaders
from t2i import T2I_PROMPT

OUTPUTS = {
    "QwenImageAsComfyModel": [("MODEL", "MODEL")],
    "ModelSamplingAuraFlow": [("MODEL", "MODEL")],
    "KSampler": [("LATENT", "LATENT")],
}

NOTE = """## Qwen-Image with ComfyUI's KSampler

The same files as the text-to-image workflow. **Qwen-Image as ComfyUI MODEL** hands our model to ComfyUI's
own nodes, so every core sampler and scheduler works (KSampler, SamplerCustomAdvanced, dpmpp_2m,
res_multistep, ...) next to core model nodes such as ModelSamplingAuraFlow, CFGNorm, EasyCache or
DifferentialDiffusion, and core LoRA loaders on bf16 / fp16 models. The model's math stays ours (GGUF,
fp8 and our LoRAs included: attach *Load Qwen-Image LoRA* before the MODEL node).

These are the settings of ComfyUI's official Qwen-Image template: ModelSamplingAuraFlow shift 3.1, 20 steps,
cfg 2.5, euler, simple. For images that match diffusers exactly, use the Qwen-Image Sampler workflow instead.
"""


def ksampler() -> list[Node]:
    return [
        *loaders("qwen_image_fp8_e4m3fn.safetensors"),
        Node(11, "QwenImageAsComfyModel", {}, inputs={"model": (1, 0, "QWENIMAGE_MODEL")}),
        Node(12, "ModelSamplingAuraFlow", {"shift": 3.1}, inputs={"model": (11, 0, "MODEL")}),
        Node(4, "QwenImageTextEncode", {"prompt": T2I_PROMPT}, inputs={"text_encoder": (2, 0, "QWENIMAGE_TEXT_ENCODER")}, size=(420, 200), title="Positive prompt"),
        Node(5, "QwenImageTextEncode", {"prompt": " "}, inputs={"text_encoder": (2, 0, "QWENIMAGE_TEXT_ENCODER")}, size=(420, 120), title="Negative prompt"),
        Node(6, "QwenImageEmptyLatent", {"width": 1328, "height": 1328, "batch_size": 1, "aspect_ratio": "1:1 (1328x1328)"}),
        Node(7, "KSampler",
             {"seed": 42, "$control_after_generate": "randomize", "steps": 20, "cfg": 2.5, "sampler_name": "euler",
              "scheduler": "simple", "denoise": 1.0},
             inputs={"model": (12, 0, "MODEL"), "positive": (4, 0, "CONDITIONING"), "negative": (5, 0, "CONDITIONING"),
                     "latent_image": (6, 0, "LATENT")}, size=(320, 300)),
        Node(8, "QwenImageVAEDecode", {"tiled": "auto"}, inputs={"vae": (3, 0, "QWENIMAGE_VAE"), "samples": (7, 0, "LATENT")}),
        Node(9, "SaveImage", {"filename_prefix": "qwen-image-ksampler"}, inputs={"images": (8, 0, "IMAGE")}, size=(400, 440)),
        Node(10, "MarkdownNote", {"text": NOTE}, size=(400, 420), title="Read me"),
    ]


WORKFLOWS = {"qwen_image_ksampler": ksampler}
