"""Edit workflows: Qwen-Image-Edit, Edit-2509 with three images, Edit-2511, and inpainting."""
from build import Node, loaders

EDIT_HF = "https://huggingface.co/Comfy-Org/Qwen-Image-Edit_ComfyUI/resolve/main/split_files/diffusion_models"
EDIT = "qwen_image_edit_fp8_e4m3fn.safetensors"
EDIT_2509 = "qwen_image_edit_2509_fp8_e4m3fn.safetensors"
EDIT_2511 = "qwen_image_edit_2511_bf16.safetensors"
MODELS = {name: (f"{EDIT_HF}/{name}", "diffusion_models") for name in (EDIT, EDIT_2509, EDIT_2511)}
OUTPUTS = {
    "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    "QwenImageEditEncode": [("conditioning", "CONDITIONING"), ("latent", "LATENT")],
    "QwenImageMatchSize": [("IMAGE", "IMAGE")],
    "QwenImageInpaintMask": [("LATENT", "LATENT")],
}

FILES = """| folder | file |
|---|---|
| models/diffusion_models | {model} |
| models/text_encoders | qwen_2.5_vl_7b_fp8_scaled.safetensors (has the vision tower edit needs; a GGUF text encoder needs its mmproj file) |
| models/vae | qwen_image_vae.safetensors |
"""

GEOMETRY = """**Geometry**: each image is resized whole (never cropped) to about 1 megapixel for the model; the result is
generated on the same grid as the {which} image and *Qwen-Image Match Size* returns it at that image's exact size,
so unchanged parts stay exactly where they were. sizing `reference` reproduces diffusers' sizes instead."""


def _edit_graph(model, variant, encode_variant, prompt, images, steps, note, weight_dtype="default") -> list[Node]:
    """images: [(node id, title)], the last one is the image the result follows."""
    nodes = loaders(model, variant, weight_dtype)
    image_inputs = {}
    for i, (nid, title) in enumerate(images):
        nodes.append(Node(nid, "LoadImage", {"image": "example.png"}, size=(320, 320), title=title,
                          group="Step 2 - Load images" if len(images) > 1 else "Step 2 - Load image"))
        image_inputs[f"image{i + 1}"] = (nid, 0, "IMAGE")
    common = {"text_encoder": (2, 0, "QWENIMAGE_TEXT_ENCODER"), "vae": (3, 0, "QWENIMAGE_VAE")}
    nodes += [
        Node(4, "QwenImageEditEncode", {"prompt": prompt, "variant": encode_variant, "sizing": "preserve"},
             inputs={**common, **image_inputs}, size=(420, 220), title="Positive prompt"),
        Node(5, "QwenImageEditEncode", {"prompt": " ", "variant": encode_variant, "sizing": "preserve"},
             inputs={**common, **image_inputs}, size=(420, 160), title="Negative prompt"),
        Node(7, "QwenImageSampler",
             {"seed": 42, "$control_after_generate": "randomize", "steps": steps, "cfg": 4.0, "shift_mode": "dynamic",
              "shift": 3.0, "sampler_name": "euler", "denoise": 1.0},
             inputs={"model": (1, 0, "QWENIMAGE_MODEL"), "positive": (4, 0, "CONDITIONING"), "latent_image": (4, 1, "LATENT"),
                     "negative": (5, 0, "CONDITIONING")}, size=(320, 300)),
        Node(8, "QwenImageVAEDecode", {"tiled": "auto"}, inputs={"vae": (3, 0, "QWENIMAGE_VAE"), "samples": (7, 0, "LATENT")}),
        Node(9, "QwenImageMatchSize", {}, inputs={"images": (8, 0, "IMAGE"), "reference": (images[-1][0], 0, "IMAGE")}, size=(280, 80)),
        Node(10, "SaveImage", {"filename_prefix": "qwen-image-edit"}, inputs={"images": (9, 0, "IMAGE")}, size=(400, 440)),
        Node(11, "MarkdownNote", {"text": note}, size=(420, 520), title="Read me"),
    ]
    return nodes


EDIT_NOTE = """## Qwen-Image-Edit

**Files**:

""" + FILES.format(model=EDIT) + """
Load your photo in *Load Image* and describe the change. Official settings: 50 steps, cfg 4, negative " ".

""" + GEOMETRY.format(which="input")

EDIT_2509_NOTE = """## Qwen-Image-Edit-2509: up to three images

**Files**:

""" + FILES.format(model=EDIT_2509) + """
Refer to the images as Picture 1, 2, 3 in the prompt (image1 is Picture 1). variant `edit-plus` is the
2509 / 2511 prompt format; keep it even with a single image. Official settings: 40 steps, cfg 4.
Remove image2 / image3 links for fewer images.

""" + GEOMETRY.format(which="last connected (here: Picture 3)")

EDIT_2511_NOTE = """## Qwen-Image-Edit-2511

**Files**:

""" + FILES.format(model=EDIT_2511) + """
The loader stores the bf16 file as fp8 (weight_dtype fp8_e4m3fn) to halve its memory; variant `edit-2511`
(also picked automatically from the file name) turns on 2511's zero-timestep reference conditioning.
Official settings: 40 steps, cfg 4. Up to three images as in the 2509 workflow.

""" + GEOMETRY.format(which="input")

INPAINT_NOTE = """## Qwen-Image inpainting

**Files**: the text-to-image files (qwen_image_fp8_e4m3fn.safetensors, qwen_2.5_vl_7b_fp8_scaled.safetensors,
qwen_image_vae.safetensors).

Right-click *Load Image* -> *Open in MaskEditor* and paint the area to change. Only the masked area is
regenerated; everything else is kept exactly (the original, re-noised, is restored outside the mask at
every step). **denoise** is how much of the masked area may change (1 = repaint from scratch), as
diffusers' inpaint `strength`. *Qwen-Image Inpaint Mask* refuses a mask that does not belong to the image.
"""


def edit() -> list[Node]:
    return _edit_graph(EDIT, "auto", "edit", "Replace the cat with a corgi wearing a red scarf", [(6, "Load Image")],
                       50, EDIT_NOTE)


def edit_2509() -> list[Node]:
    return _edit_graph(
        EDIT_2509, "auto", "edit-plus",
        "The woman from Picture 1 holds the bag from Picture 2 in the room of Picture 3",
        [(6, "Picture 1"), (12, "Picture 2"), (13, "Picture 3 (result follows this one)")], 40, EDIT_2509_NOTE)


def edit_2511() -> list[Node]:
    return _edit_graph(EDIT_2511, "edit-2511", "edit-plus", "Make it a snowy winter evening, keep everything else",
                       [(6, "Load Image")], 40, EDIT_2511_NOTE, weight_dtype="fp8_e4m3fn")


def inpaint() -> list[Node]:
    return [
        *loaders("qwen_image_fp8_e4m3fn.safetensors"),
        Node(6, "LoadImage", {"image": "example.png"}, size=(320, 320), title="Image + mask", group="Step 2 - Image and mask"),
        Node(4, "QwenImageTextEncode", {"prompt": "a vase of sunflowers on the table"},
             inputs={"text_encoder": (2, 0, "QWENIMAGE_TEXT_ENCODER")}, size=(420, 160), title="Positive prompt"),
        Node(5, "QwenImageTextEncode", {"prompt": " "}, inputs={"text_encoder": (2, 0, "QWENIMAGE_TEXT_ENCODER")}, size=(420, 120), title="Negative prompt"),
        Node(12, "QwenImageVAEEncode", {"tiled": "auto"}, inputs={"vae": (3, 0, "QWENIMAGE_VAE"), "pixels": (6, 0, "IMAGE")}),
        Node(13, "QwenImageInpaintMask", {}, inputs={"samples": (12, 0, "LATENT"), "mask": (6, 1, "MASK")}),
        Node(7, "QwenImageSampler",
             {"seed": 42, "$control_after_generate": "randomize", "steps": 50, "cfg": 4.0, "shift_mode": "dynamic",
              "shift": 3.0, "sampler_name": "euler", "denoise": 0.9},
             inputs={"model": (1, 0, "QWENIMAGE_MODEL"), "positive": (4, 0, "CONDITIONING"), "latent_image": (13, 0, "LATENT"),
                     "negative": (5, 0, "CONDITIONING")}, size=(320, 300)),
        Node(8, "QwenImageVAEDecode", {"tiled": "auto"}, inputs={"vae": (3, 0, "QWENIMAGE_VAE"), "samples": (7, 0, "LATENT")}),
        Node(10, "SaveImage", {"filename_prefix": "qwen-image-inpaint"}, inputs={"images": (8, 0, "IMAGE")}, size=(400, 440)),
        Node(11, "MarkdownNote", {"text": INPAINT_NOTE}, size=(420, 400), title="Read me"),
    ]


WORKFLOWS = {
    "qwen_image_edit": edit,
    "qwen_image_edit_2509": edit_2509,
    "qwen_image_edit_2511": edit_2511,
    "qwen_image_inpaint": inpaint,
}
