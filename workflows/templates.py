"""How the bundled workflows appear in ComfyUI's template browser: order, title, one-line description.

build.py writes this into js/lib/template_info.js (the frontend extension shows it) and draws
each workflow's thumbnail, workflows/<name>.jpg, from it. Not a .json: every .json in workflows/
is offered as a template.
"""

TEMPLATES = [
    ("qwen_image_t2i", "Qwen-Image: text to image",
     "The official settings (50 steps, cfg 4); matches diffusers for a given seed."),
    ("qwen_image_lightning_8steps", "Qwen-Image: Lightning, 8 steps",
     "Text to image in 8 steps with the Lightning LoRA, cfg 1."),
    ("qwen_image_gguf", "Qwen-Image: GGUF (12-16 GB GPUs)",
     "Text to image from a quantized GGUF model, kept quantized in memory."),
    ("qwen_image_ksampler", "Qwen-Image with ComfyUI's KSampler",
     "Our model as a ComfyUI MODEL: core samplers, schedulers and model nodes."),
    ("qwen_image_edit", "Qwen-Image-Edit",
     "Edit a photo with a prompt; unchanged parts stay where they were."),
    ("qwen_image_edit_2509", "Qwen-Image-Edit-2509: up to three images",
     "Combine Picture 1, 2 and 3 in one edit."),
    ("qwen_image_edit_2511", "Qwen-Image-Edit-2511",
     "The 2511 edit model, stored as fp8 on load."),
    ("qwen_image_inpaint", "Qwen-Image: inpainting",
     "Repaint a masked area; everything else is kept exactly."),
    ("qwen_image_controlnet_union_canny", "Qwen-Image: ControlNet Union (canny)",
     "Follow the edges of an image with InstantX's Union ControlNet."),
    ("qwen_image_controlnet_diffsynth_canny", "Qwen-Image: DiffSynth canny patch",
     "A lighter ControlNet: DiffSynth's model patch on a canny map."),
    ("qwen_image_controlnet_inpaint", "Qwen-Image: ControlNet inpainting",
     "Repaint a masked area with InstantX's inpainting ControlNet."),
    ("qwen_image_union_control_lora", "Qwen-Image: union control LoRA",
     "Any control map (canny, depth, pose) through one LoRA, as a reference latent."),
    ("qwen_image_2512_fun_controlnet", "Qwen-Image-2512: Fun ControlNet Union",
     "Qwen-Image-2512 following a canny map with alibaba-pai's Fun ControlNet."),
    ("qwen_image_layered", "Qwen-Image-Layered: image to RGBA layers",
     "Decompose a picture into transparent layers (PNG with alpha)."),
    ("qwen_image_layered_control", "Qwen-Image-Layered-Control: one layer by name",
     "Take out the element a prompt names as a transparent layer."),
]
