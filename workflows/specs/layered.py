"""Qwen-Image-Layered: an image decomposed into RGBA layers; Layered-Control: the one layer a prompt names
(the official templates image_qwen_image_layered and image_qwen_image_layered_control)."""
from build import Node, loaders

LAYERED = "qwen_image_layered_bf16.safetensors"
CONTROL = "qwen_image_layered_control_bf16.safetensors"
RGBA_VAE = "qwen_image_layered_vae.safetensors"
_HF = "https://huggingface.co/Comfy-Org/Qwen-Image-Layered_ComfyUI/resolve/main/split_files"
MODELS = {
    LAYERED: (f"{_HF}/diffusion_models/{LAYERED}", "diffusion_models"),
    RGBA_VAE: (f"{_HF}/vae/{RGBA_VAE}", "vae"),
    CONTROL: (f"https://huggingface.co/DiffSynth-Studio/Qwen-Image-Layered-Control/resolve/main/{CONTROL}", "diffusion_models"),
}
OUTPUTS = {
    "ImageScaleToMaxDimension": [("IMAGE", "IMAGE")],
    "ReferenceLatent": [("CONDITIONING", "CONDITIONING")],
    "QwenImageEmptyLayeredLatent": [("LATENT", "LATENT")],
    "QwenImageDecodeLayers": [("layers", "IMAGE"), ("mask", "MASK"), ("rgba", "IMAGE")],
}

PROMPT = (
    "A cinematic medium shot of a young woman with curly auburn hair and a joyful smile, looking back over her "
    "shoulder on a rocky coastline, a sparkling sea and a tall ship with full sails in the distance, warm golden "
    "afternoon light."
)

LAYERED_NOTE = f"""## Qwen-Image-Layered: an image into RGBA layers

**Files**: {LAYERED} in **models/diffusion_models**, {RGBA_VAE} (the RGBA VAE: the plain Qwen-Image VAE is
refused with a message) in **models/vae**, plus the text encoder.

Load the image; it is brought to 640 px on its longest side (the size the model was trained at) and encoded as
the reference. Describe the whole image in the prompt. *layers* sets how many RGBA layers come out (2-8).

*Decode Layers* gives each layer as RGBA (SaveImage writes transparent PNGs), as RGB, and its transparency as a
MASK in ComfyUI's convention (1 = transparent, as Load Image gives): *Join Image with Alpha* and the compositing
nodes take them as they are.

**Settings** (official template): 20 steps, cfg 2.5, shift_mode constant, shift 1.
"""

CONTROL_NOTE = f"""## Qwen-Image-Layered-Control: one layer by name

**Files**: {CONTROL} (DiffSynth-Studio) in **models/diffusion_models** (stored as fp8 on load), {RGBA_VAE} in
**models/vae**, plus the text encoder.

The prompt names the element to take out of the image ("guitar", "the red car"); the layers below hold it on a
transparent background. Same settings as Qwen-Image-Layered: 20 steps, cfg 2.5, shift 1.
"""


def _graph(model: str, weight_dtype: str, prompt: str, note: str, prefix: str) -> list[Node]:
    return [
        *loaders(model, weight_dtype=weight_dtype, vae=RGBA_VAE),
        Node(4, "LoadImage", {"image": "example.png"}, size=(320, 360)),
        Node(5, "ImageScaleToMaxDimension", {"upscale_method": "lanczos", "largest_size": 640},
             inputs={"image": (4, 0, "IMAGE")}, group="Step 2 - Load image", column=1),
        Node(6, "QwenImageVAEEncode", {"tiled": "auto"}, inputs={"vae": (3, 0, "QWENIMAGE_VAE"), "pixels": (5, 0, "IMAGE")},
             group="Step 2 - Load image", column=1),
        Node(7, "QwenImageTextEncode", {"prompt": prompt}, inputs={"text_encoder": (2, 0, "QWENIMAGE_TEXT_ENCODER")}, size=(420, 200), title="Positive prompt"),
        Node(8, "QwenImageTextEncode", {"prompt": " "}, inputs={"text_encoder": (2, 0, "QWENIMAGE_TEXT_ENCODER")}, size=(420, 120), title="Negative prompt"),
        Node(9, "ReferenceLatent", {}, inputs={"conditioning": (7, 0, "CONDITIONING"), "latent": (6, 0, "LATENT")}),
        Node(10, "ReferenceLatent", {}, inputs={"conditioning": (8, 0, "CONDITIONING"), "latent": (6, 0, "LATENT")}),
        Node(11, "QwenImageEmptyLayeredLatent", {"width": 640, "height": 640, "layers": 2, "batch_size": 1},
             inputs={"size_from": (6, 0, "LATENT")}),
        Node(12, "QwenImageSampler",
             {"seed": 42, "$control_after_generate": "randomize", "steps": 20, "cfg": 2.5, "shift_mode": "constant", "shift": 1.0,
              "sampler_name": "euler", "denoise": 1.0},
             inputs={"model": (1, 0, "QWENIMAGE_MODEL"), "positive": (9, 0, "CONDITIONING"), "latent_image": (11, 0, "LATENT"),
                     "negative": (10, 0, "CONDITIONING")}, size=(320, 300)),
        Node(13, "QwenImageDecodeLayers", {"include_composite": False, "tiled": "auto"},
             inputs={"vae": (3, 0, "QWENIMAGE_VAE"), "samples": (12, 0, "LATENT")}),
        Node(14, "SaveImage", {"filename_prefix": prefix}, inputs={"images": (13, 2, "IMAGE")}, size=(400, 440)),
        Node(15, "MarkdownNote", {"text": note}, size=(420, 460), title="Read me"),
    ]


def layered() -> list[Node]:
    return _graph(LAYERED, "default", PROMPT, LAYERED_NOTE, "qwen-image-layers")


def layered_control() -> list[Node]:
    return _graph(CONTROL, "fp8_e4m3fn", "guitar", CONTROL_NOTE, "qwen-image-layer")


WORKFLOWS = {"qwen_image_layered": layered, "qwen_image_layered_control": layered_control}
