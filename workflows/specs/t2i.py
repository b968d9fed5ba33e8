"""Text-to-image: the official settings (50 steps, cfg 4, dynamic shift, negative " ")."""
from build import Node, loaders

T2I_PROMPT = (
    "A cozy bookshop cafe on a rainy evening, warm light spilling onto the wet street, a chalkboard sign "
    "by the door that reads \"Qwen-Image Books & Tea\", people reading by the window, cinematic, highly detailed."
)

QWEN_2512 = "qwen_image_2512_fp8_e4m3fn.safetensors"  # the December 2025 model: same architecture, same nodes
MODELS = {QWEN_2512: ("https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/diffusion_models/"
                      f"{QWEN_2512}", "diffusion_models")}

T2I_NOTE = """## Qwen-Image text to image

**Files** (put them in these ComfyUI folders):

| folder | file |
|---|---|
| models/diffusion_models | qwen_image_fp8_e4m3fn.safetensors (20 GB) or qwen_image_bf16.safetensors, or a GGUF such as qwen-image-Q4_K_M.gguf; Qwen-Image-2512 (qwen_image_2512_fp8_e4m3fn.safetensors) loads the same way |
| models/text_encoders | qwen_2.5_vl_7b_fp8_scaled.safetensors (or qwen_2.5_vl_7b.safetensors) |
| models/vae | qwen_image_vae.safetensors |

The diffusion model loader can store a bf16 file as fp8 (weight_dtype fp8_e4m3fn) to halve its memory.

**Faster** (optional): *Speed Options* and *Torch Compile* below the loaders are switched off (bypassed, purple).
Select one and press Ctrl+B to turn it on: fp8_matmul runs fp8 models in float8 on RTX 40xx / H100; attention can
use SageAttention or FlashAttention when installed; Torch Compile compiles the model once (the first run takes a
minute or more), then every size reuses it.

**Settings**: the official recommendation is 50 steps, cfg 4, shift_mode dynamic and a negative prompt of " ".
With a Lightning LoRA use 4 or 8 steps, cfg 1, shift_mode constant, shift 3.
For a given seed the result matches diffusers' QwenImagePipeline.
"""


def speed_nodes(model: tuple, fp8_matmul: str, ids: tuple = (11, 12)) -> list[Node]:
    """Speed Options -> Torch Compile after ``model`` (node id, slot), both shipped bypassed;
    the sampler takes its model from the second one (``ids[1]``, slot 0)."""
    first, second = ids
    return [
        Node(first, "QwenImageSpeedOptions",
             {"attention": "sdpa", "fp8_matmul": fp8_matmul, "int8_matmul": "off", "blockscaled_matmul": "off"},
             inputs={"model": (*model, "QWENIMAGE_MODEL")}, bypassed=True),
        Node(second, "QwenImageTorchCompile", {"backend": "inductor", "mode": "default"},
             inputs={"model": (first, 0, "QWENIMAGE_MODEL")}, bypassed=True),
    ]


def t2i_graph(model_name: str, note: str, prefix: str, also: tuple = ()) -> list[Node]:
    """The official text-to-image graph around the diffusion model file ``model_name`` (``also``:
    other files the loader is offered, listed with their download links)."""
    fp8 = "auto" if "fp8" in model_name else "off"
    return [
        *loaders(model_name, also=also),
        Node(4, "QwenImageTextEncode", {"prompt": T2I_PROMPT}, inputs={"text_encoder": (2, 0, "QWENIMAGE_TEXT_ENCODER")}, size=(420, 200), title="Positive prompt"),
        Node(5, "QwenImageTextEncode", {"prompt": " "}, inputs={"text_encoder": (2, 0, "QWENIMAGE_TEXT_ENCODER")}, size=(420, 120), title="Negative prompt"),
        Node(6, "QwenImageEmptyLatent", {"width": 1328, "height": 1328, "batch_size": 1, "aspect_ratio": "1:1 (1328x1328)"}),
        Node(7, "QwenImageSampler",
             {"seed": 42, "$control_after_generate": "randomize", "steps": 50, "cfg": 4.0, "shift_mode": "dynamic", "shift": 3.0,
              "sampler_name": "euler", "denoise": 1.0},
             inputs={"model": (12, 0, "QWENIMAGE_MODEL"), "positive": (4, 0, "CONDITIONING"), "latent_image": (6, 0, "LATENT"),
                     "negative": (5, 0, "CONDITIONING")}, size=(320, 300)),
        Node(8, "QwenImageVAEDecode", {"tiled": "auto"}, inputs={"vae": (3, 0, "QWENIMAGE_VAE"), "samples": (7, 0, "LATENT")}),
        Node(9, "SaveImage", {"filename_prefix": prefix}, inputs={"images": (8, 0, "IMAGE")}, size=(400, 440)),
        Node(10, "MarkdownNote", {"text": note}, size=(400, 560), title="Read me"),
    ] + speed_nodes((1, 0), fp8)


def t2i() -> list[Node]:
    return t2i_graph("qwen_image_fp8_e4m3fn.safetensors", T2I_NOTE, "qwen-image", also=(QWEN_2512,))


WORKFLOWS = {"qwen_image_t2i": t2i}
