"""Pure-PyTorch Qwen-Image models, weight formats and sampling math (no ComfyUI imports)."""
