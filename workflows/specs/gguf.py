"""GGUF: a Q4_K_M diffusion model (13 GB) for 12-16 GB GPUs, kept quantized in memory."""
from t2i import t2i_graph

GGUF = "qwen-image-Q4_K_M.gguf"
MODELS = {GGUF: (f"https://huggingface.co/city96/Qwen-Image-gguf/resolve/main/{GGUF}", "diffusion_models")}

NOTE = """## Qwen-Image from GGUF

Put a GGUF diffusion model in **models/diffusion_models** (or unet): qwen-image-Q4_K_M.gguf (13 GB), Q8_0 (22 GB),
Q4_0, Q5_K_M, ... Weights stay quantized in memory and are dequantized on the GPU inside each layer.
The text encoder may also be a GGUF (Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf in models/text_encoders); its vision tower
(for edit) is the separate mmproj file, chosen in the loader's mmproj_name.
Settings as in the text-to-image workflow: 50 steps, cfg 4, shift_mode dynamic.
"""


def gguf():
    return t2i_graph(GGUF, NOTE, "qwen-image-gguf")


WORKFLOWS = {"qwen_image_gguf": gguf}
