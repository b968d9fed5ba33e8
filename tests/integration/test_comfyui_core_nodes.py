"""Our model through a chain of ComfyUI's own model and sampling nodes, queued on a real server.

'Qwen-Image as ComfyUI MODEL' -> ModelSamplingAuraFlow -> core LoraLoaderModelOnly (the tiny
LoRA, dense fp32 weights) -> EasyCache -> CFGNorm -> DifferentialDiffusion -> KSamplerAdvanced
(res_multistep), with core ReferenceLatent on the positive: every node runs and an image comes
back. Skipped without COMFYUI_DIR (see comfyui_harness.py).
"""
from __future__ import annotations

import json
import time


from conftest import ROOT
from test_comfyui import server  # noqa: F401  (the shared fixture)

KSAMPLER_WORKFLOW = ROOT / "workflows" / "api" / "qwen_image_ksampler.json"


def _core_chain(files: dict) -> dict:
    prompt = json.loads(KSAMPLER_WORKFLOW.read_text(encoding="utf-8"))
    ids = {n["class_type"]: k for k, n in prompt.items() if n["class_type"] != "QwenImageTextEncode"}
    prompt[ids["QwenImageDiTLoader"]]["inputs"]["model_name"] = files["model"]
    prompt[ids["QwenImageTextEncoderLoader"]]["inputs"]["text_encoder_name"] = files["text_encoder"]
    prompt[ids["QwenImageVAELoader"]]["inputs"]["vae_name"] = files["vae"]
    latent = prompt[ids["QwenImageEmptyLatent"]]["inputs"]
    latent.update(width=64, height=48, aspect_ratio="custom")
    sampler = prompt.pop(ids["KSampler"])["inputs"]
    prompt.update({
        "20": {"class_type": "LoraLoaderModelOnly",
               "inputs": {"model": [ids["ModelSamplingAuraFlow"], 0], "lora_name": files["lora"], "strength_model": 1.0}},
        "21": {"class_type": "EasyCache",
               "inputs": {"model": ["20", 0], "reuse_threshold": 0.2, "start_percent": 0.15, "end_percent": 0.95,
                          "verbose": False}},
        "22": {"class_type": "CFGNorm", "inputs": {"model": ["21", 0], "strength": 1.0}},
        "23": {"class_type": "DifferentialDiffusion", "inputs": {"model": ["22", 0]}},
        "24": {"class_type": "ReferenceLatent", "inputs": {"conditioning": sampler["positive"],
                                                            "latent": [ids["QwenImageEmptyLatent"], 0]}},
        ids["KSampler"]: {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["23", 0], "add_noise": "enable", "noise_seed": 11, "steps": 3, "cfg": 2.5,
            "sampler_name": "res_multistep", "scheduler": "simple", "positive": ["24", 0],
            "negative": sampler["negative"], "latent_image": sampler["latent_image"], "start_at_step": 0,
            "end_at_step": 10000, "return_with_leftover_noise": "disable"}},
    })
    return prompt


def test_core_model_nodes_and_samplers_run_our_model(server):
    prompt = _core_chain(server.files)
    reply = server.post_json("/prompt", {"prompt": prompt, "client_id": "qwenimage-core-nodes"})
    assert reply and "prompt_id" in reply and not reply.get("node_errors"), reply
    deadline = time.monotonic() + 300
    entry = None
    while time.monotonic() < deadline and not entry:
        entry = server.get_json(f"/history/{reply['prompt_id']}").get(reply["prompt_id"])
        time.sleep(0.2)
    assert entry, f"the prompt did not finish:\n{server.log_tail()}"
    assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{server.log_tail()}"
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert len(images) == 1, entry["outputs"]
