#!/usr/bin/env python3
"""Queue a Qwen-Image workflow on a running ComfyUI and save the images it makes.

    python tools/qwenimage_queue.py --workflow qwen_image_t2i --prompt "a red fox" --seed 7 --out outputs/

--workflow takes an API-format file (ComfyUI: Workflow > Export (API)) or the name of a bundled
workflow in workflows/api/. The tool checks every --set against the node's inputs (/object_info),
posts the workflow to /prompt, shows the running node and the sampler's steps (ComfyUI's /ws
websocket, read with the standard library; see qwenimage_queue_progress.py), waits for the
result by polling /history, and downloads every image the run produced through /view.
Only the standard library is needed.

Exit status: 0 when the images were saved, 1 when ComfyUI rejected any part of the workflow
(the rest is cancelled, not run) or failed the prompt (the message names the node and input),
2 for bad arguments, 3 on timeout.
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import mimetypes
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "workflows" / "api"
DEFAULT_SERVER = "http://127.0.0.1:8188"

# --model / --text-encoder / --vae / --lora: which input of which of our loader nodes they set.
FILE_OVERRIDES = {
    "model": (("QwenImageDiTLoader", "model_name"),),
    "text_encoder": (("QwenImageTextEncoderLoader", "text_encoder_name"),),
    "vae": (("QwenImageVAELoader", "vae_name"),),
    "lora": (("QwenImageLoraLoader", "lora_name"),),
}
# Inputs holding a prompt's text, for the nodes feeding a sampler's positive / negative.
TEXT_INPUTS = ("prompt", "text")
SEED_INPUTS = ("seed", "noise_seed")
POLL_SECONDS = 0.5


def _load_sibling(name: str):
    """A module next to this file, found whether this runs as a script or is loaded by path."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(name + ".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


progress_mod = _load_sibling("qwenimage_queue_progress")


class QueueError(Exception):
    """A failure to report to the user in one message (exit status in ``code``)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------- workflow

def bundled_names() -> list[str]:
    return sorted(p.stem for p in BUNDLED.glob("*.json"))


def load_workflow(spec: str) -> dict:
    """An API-format prompt from a path or a bundled workflow name."""
    path = Path(spec)
    if not path.is_file():
        name = spec[:-5] if spec.endswith(".json") else spec
        path = BUNDLED / f"{name}.json"
        if not path.is_file():
            raise QueueError(
                f"workflow {spec!r} is neither a file nor a bundled workflow; bundled: {', '.join(bundled_names()) or 'none'}", 2
            )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise QueueError(f"{path}: not a readable JSON file ({err})", 2) from err
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        raise QueueError(
            f"{path} is a UI-format workflow; the API needs the API format (workflows/api/{path.name}, "
            "or ComfyUI's Workflow > Export (API))", 2
        )
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]  # a saved /prompt request body
    if not isinstance(data, dict) or not data or not all(isinstance(n, dict) and "class_type" in n for n in data.values()):
        raise QueueError(f"{path}: expected an API-format workflow ({{node id: {{class_type, inputs}}}})", 2)
    return data


def _nodes_of(prompt: dict, class_type: str) -> list[str]:
    ids = [i for i, n in prompt.items() if n.get("class_type") == class_type]
    return sorted(ids, key=lambda i: (len(i), i))  # numeric order for numeric ids


def _link_source(value):
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
        return value[0]
    return None


def prompt_text_nodes(prompt: dict, which: str) -> list[str]:
    """Nodes whose text reaches a sampler's ``which`` input ("positive" / "negative"),
    following pass-through nodes (e.g. a reference-latent node) until a text input is found."""
    found: list[str] = []
    for node in prompt.values():
        src = _link_source(node.get("inputs", {}).get(which))
        seen = set()
        while src is not None and src in prompt and src not in seen:
            seen.add(src)
            inputs = prompt[src].get("inputs", {})
            if any(isinstance(inputs.get(k), str) for k in TEXT_INPUTS):
                if src not in found:
                    found.append(src)
                break
            # A node passing conditioning through (reference latents, ControlNet apply): follow it.
            src = _link_source(inputs.get(which)) or _link_source(inputs.get("conditioning"))
    return found


def parse_value(text: str):
    """JSON when it parses (numbers, true/false, lists), the plain string otherwise."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def apply_overrides(prompt: dict, args, input_names=None) -> list[str]:
    """Change the prompt in place; returns a line per change for the console.

    ``input_names(class_type)``: the inputs a node type takes (a set), or None when unknown;
    --set refuses any other name, since ComfyUI ignores an unknown input without a word."""
    changes: list[str] = []

    def set_input(node_id: str, name: str, value) -> None:
        prompt[node_id].setdefault("inputs", {})[name] = value
        changes.append(f"{node_id}.{name} = {value!r}")

    for which, text in (("positive", args.prompt), ("negative", args.negative)):
        if text is None:
            continue
        targets = prompt_text_nodes(prompt, which)
        if not targets:
            raise QueueError(f"--{'prompt' if which == 'positive' else 'negative'}: the workflow has no text node feeding a sampler's {which} input", 2)
        for node_id in targets:
            inputs = prompt[node_id]["inputs"]
            set_input(node_id, next(k for k in TEXT_INPUTS if isinstance(inputs.get(k), str)), text)

    for option, names in (("seed", SEED_INPUTS), ("steps", ("steps",))):
        value = getattr(args, option)
        if value is None:
            continue
        targets = [(i, k) for i, n in prompt.items() for k in names if k in n.get("inputs", {}) and _link_source(n["inputs"][k]) is None]
        if not targets:
            raise QueueError(f"--{option}: no node in the workflow has a {' / '.join(names)} input", 2)
        for node_id, name in targets:
            set_input(node_id, name, value)

    for option, slots in FILE_OVERRIDES.items():
        values = getattr(args, option) or []
        if isinstance(values, str):
            values = [values]
        if not values:
            continue
        targets = [(i, name) for class_type, name in slots for i in _nodes_of(prompt, class_type)]
        if not targets:
            wanted = " / ".join(c for c, _ in slots)
            raise QueueError(f"--{option.replace('_', '-')}: the workflow has no {wanted} node", 2)
        if len(values) > len(targets):
            raise QueueError(f"--{option.replace('_', '-')} given {len(values)} times but the workflow has {len(targets)} such node(s)", 2)
        # One value sets every such node; several values go to the nodes in id order.
        pairs = zip(targets, values * len(targets)) if len(values) == 1 else zip(targets, values)
        for (node_id, name), value in pairs:
            set_input(node_id, name, value)

    for item in args.set or []:
        key, sep, raw = item.partition("=")
        node_id, dot, name = key.partition(".")
        if not sep or not dot or not node_id or not name:
            raise QueueError(f"--set {item!r}: expected NODE_ID.INPUT=VALUE, e.g. --set 6.width=1024", 2)
        if node_id not in prompt:
            raise QueueError(f"--set {item!r}: the workflow has no node {node_id!r} (nodes: {', '.join(sorted(prompt, key=lambda i: (len(i), i)))})", 2)
        check_input_name(prompt, node_id, name, item, input_names)
        set_input(node_id, name, parse_value(raw))
    return changes


def check_input_name(prompt: dict, node_id: str, name: str, item: str, input_names) -> None:
    """Refuse an input the node does not take (a typo would otherwise leave the default in place)."""
    class_type = prompt[node_id].get("class_type")
    known = input_names(class_type) if input_names is not None else None
    if known is None:  # node type unknown to this server: ComfyUI's own validation names it
        return
    valid = set(known) | set(prompt[node_id].get("inputs", {}))
    if name in valid:
        return
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise QueueError(f"--set {item!r}: node {node_id} ({class_type}) has no input {name!r}{hint}; "
                     f"its inputs: {', '.join(sorted(valid))}", 2)


# ----------------------------------------------------------------------------- HTTP

class Client:
    def __init__(self, server: str, timeout: float = 30.0):
        if "://" not in server:
            server = "http://" + server
        self.base = server.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex
        self._object_info: dict = {}

    def _open(self, request: urllib.request.Request):
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise QueueError(f"could not reach ComfyUI at {self.base} ({reason}); is it running? (--server)") from err

    def get_json(self, path: str):
        with self._open(urllib.request.Request(self.base + path)) as r:
            return json.loads(r.read().decode("utf-8"))

    def post_json(self, path: str, body) -> tuple[int, object]:
        data = json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with self._open(req) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as err:
            raw, status = err.read(), err.code
        try:
            return status, json.loads(raw.decode("utf-8")) if raw else None
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def get_bytes(self, path: str) -> bytes:
        try:
            with self._open(urllib.request.Request(self.base + path)) as r:
                return r.read()
        except urllib.error.HTTPError as err:
            raise QueueError(f"ComfyUI answered {err.code} for {path}") from err

    def upload_image(self, path: Path) -> str:
        """Upload a file to ComfyUI's input folder; returns the name LoadImage should use."""
        boundary = uuid.uuid4().hex
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        body = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: {ctype}\r\n\r\n"
        ).encode() + path.read_bytes() + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n--{boundary}--\r\n"
        ).encode()
        req = urllib.request.Request(self.base + "/upload/image", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        try:
            with self._open(req) as r:
                info = json.loads(r.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            raise QueueError(f"uploading {path} failed: ComfyUI answered {err.code}") from err
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def queue(self, prompt: dict) -> str:
        status, reply = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200 or not isinstance(reply, dict) or "prompt_id" not in reply:
            raise QueueError("ComfyUI rejected the workflow:\n" + describe_rejection(reply, prompt))
        prompt_id = reply["prompt_id"]
        if reply.get("node_errors"):
            # ComfyUI queues the outputs that passed validation and drops the rest; running that
            # remainder would "succeed" without the images asked for, so take it back at once.
            state = self.cancel(prompt_id)
            raise QueueError(f"ComfyUI rejected part of the workflow; prompt {prompt_id} was {state}, nothing saved:\n"
                             + describe_rejection({"node_errors": reply["node_errors"]}, prompt))
        return prompt_id

    def cancel(self, prompt_id: str) -> str:
        """Take a queued prompt back: out of the queue, or interrupted if it already runs."""
        self.post_json("/queue", {"delete": [prompt_id]})
        if self.queue_position(prompt_id) != "running":
            return "cancelled before it ran"
        # With a prompt_id, /interrupt stops only that prompt (ComfyUI 0.3.6x and 0.30); another
        # client's prompt running by then is left alone.
        self.post_json("/interrupt", {"prompt_id": prompt_id})
        return "interrupted"

    def input_names(self, class_type: str):
        """The required and optional inputs of a node type (/object_info), None when unknown."""
        if class_type not in self._object_info:
            try:
                info = self.get_json(f"/object_info/{urllib.parse.quote(class_type, safe='')}").get(class_type)
            except (urllib.error.HTTPError, ValueError, AttributeError):
                info = None
            spec = (info or {}).get("input") if isinstance(info, dict) else None
            self._object_info[class_type] = None if not isinstance(spec, dict) else {
                name for section in ("required", "optional") for name in (spec.get(section) or {})}
        return self._object_info[class_type]

    def history(self, prompt_id: str):
        return self.get_json(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)

    def queue_position(self, prompt_id: str) -> str:
        q = self.get_json("/queue")
        if any(item[1] == prompt_id for item in q.get("queue_running", [])):
            return "running"
        pending = sorted(q.get("queue_pending", []), key=lambda item: item[0])
        for pos, item in enumerate(pending):
            if item[1] == prompt_id:
                return f"waiting ({pos} ahead)"
        return "unknown"


def describe_rejection(reply, prompt: dict) -> str:
    if not isinstance(reply, dict):
        return f"  {reply!r}"
    lines = []
    error = reply.get("error")
    if isinstance(error, dict):
        lines.append(f"  {error.get('message', '')}: {error.get('details', '')}".rstrip(": "))
    elif error:
        lines.append(f"  {error}")
    for node_id, info in (reply.get("node_errors") or {}).items():
        class_type = info.get("class_type") or prompt.get(node_id, {}).get("class_type", "?")
        for e in info.get("errors", []):
            name = (e.get("extra_info") or {}).get("input_name")
            where = f"node {node_id} ({class_type})" + (f" input {name!r}" if name else "")
            lines.append(f"  {where}: {e.get('message', '')}: {e.get('details', '')}".rstrip(": "))
        if info.get("dependent_outputs"):
            lines.append(f"    (blocks output node(s) {', '.join(map(str, info['dependent_outputs']))})")
    return "\n".join(lines) or f"  {json.dumps(reply)[:2000]}"


# ----------------------------------------------------------------------------- waiting

def wait_for(client: Client, prompt_id: str, timeout: float, progress=None, quiet: bool = False) -> dict:
    """The history entry of a finished prompt; raises QueueError on failure, interrupt or timeout."""
    deadline = time.monotonic() + timeout
    last_state = None
    while True:
        entry = client.history(prompt_id)
        if entry:  # ComfyUI writes the history entry when the prompt is done, either way
            status = entry.get("status") or {}
            if status.get("status_str") == "error" or status.get("completed") is False:
                raise QueueError(describe_failure(prompt_id, status))
            return entry
        if time.monotonic() > deadline:
            raise QueueError(f"prompt {prompt_id} did not finish within {timeout:g} s (it is still queued or running in ComfyUI)", 3)
        state = client.queue_position(prompt_id)
        if state != last_state and state != "unknown" and not quiet:  # unknown: ended, history not yet written
            print(f"  {state}", flush=True)
            last_state = state
        if progress is not None:
            progress.pump(POLL_SECONDS)
        else:
            time.sleep(POLL_SECONDS)


def describe_failure(prompt_id: str, status: dict) -> str:
    for event, data in status.get("messages") or []:
        if event == "execution_interrupted":
            return f"prompt {prompt_id} was interrupted at node {data.get('node_id')} ({data.get('node_type')})"
        if event == "execution_error":
            return (f"prompt {prompt_id} failed at node {data.get('node_id')} ({data.get('node_type')}): "
                    f"{data.get('exception_type', 'error')}: {str(data.get('exception_message', '')).strip()}")
    return f"prompt {prompt_id} ended with status {status.get('status_str')!r}"


def output_images(entry: dict, previews: bool = False) -> list[dict]:
    """Images of the finished prompt: SaveImage's ("output"), and PreviewImage's ("temp") on request."""
    images = []
    for node_id, out in sorted((entry.get("outputs") or {}).items(), key=lambda kv: (len(kv[0]), kv[0])):
        for img in out.get("images", []) or []:
            if isinstance(img, dict) and img.get("filename") and (previews or img.get("type", "output") == "output"):
                images.append(img)
    return images


def save_images(client: Client, images: list[dict], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for img in images:
        query = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img.get("subfolder", ""), "type": img.get("type", "output")})
        data = client.get_bytes(f"/view?{query}")
        dest = out_dir / Path(img["filename"]).name
        stem, n = dest.stem, 1
        while dest.exists():  # never overwrite an earlier run's picture
            dest = out_dir / f"{stem}_{n}{dest.suffix}"
            n += 1
        dest.write_bytes(data)
        saved.append(dest)
    return saved


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Bundled workflows: " + (", ".join(bundled_names()) or "none"))
    p.add_argument("--server", default=DEFAULT_SERVER, help=f"ComfyUI address (default {DEFAULT_SERVER})")
    p.add_argument("--workflow", required=True, help="API-format workflow file, or a bundled workflow name")
    p.add_argument("--prompt", help="text for the node(s) feeding the sampler's positive input")
    p.add_argument("--negative", help="text for the node(s) feeding the sampler's negative input")
    p.add_argument("--seed", type=int, help="seed for every node with a seed input")
    p.add_argument("--steps", type=int, help="steps for every node with a steps input")
    p.add_argument("--model", help="diffusion model file (QwenImageDiTLoader.model_name)")
    p.add_argument("--text-encoder", dest="text_encoder", help="text encoder file (QwenImageTextEncoderLoader.text_encoder_name)")
    p.add_argument("--vae", help="VAE file (QwenImageVAELoader.vae_name)")
    p.add_argument("--lora", action="append", help="LoRA file; once for every LoRA loader, or repeated for each in node-id order")
    p.add_argument("--image", action="append", metavar="PATH",
                   help="upload an image and use it in the LoadImage nodes (one for all, or repeated in node-id order)")
    p.add_argument("--set", action="append", metavar="NODE_ID.INPUT=VALUE", help="set any input; VALUE is parsed as JSON when it can be")
    p.add_argument("--out", default="qwenimage_outputs", help="folder for the images (default ./qwenimage_outputs)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the result (default 3600)")
    p.add_argument("--previews", action="store_true", help="also save PreviewImage results (ComfyUI's temp images)")
    p.add_argument("--no-wait", action="store_true", help="queue and print the prompt id only")
    p.add_argument("--no-websocket", action="store_true", help="no live node / step progress: only poll /queue and /history")
    p.add_argument("--quiet", action="store_true", help="print only the saved files (with --no-wait: the prompt id) and errors")
    return p


def run(argv: list[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    prompt = load_workflow(args.workflow)
    client = Client(args.server)
    # Every override is checked before anything is uploaded or queued.
    changes = apply_overrides(prompt, args, client.input_names if args.set else None)
    if args.image:
        loaders = _nodes_of(prompt, "LoadImage")
        if not loaders:
            raise QueueError("--image: the workflow has no LoadImage node", 2)
        if len(args.image) > 1 and len(args.image) != len(loaders):
            raise QueueError(f"--image given {len(args.image)} times but the workflow has {len(loaders)} LoadImage node(s)", 2)
        for p in args.image:
            if not Path(p).is_file():
                raise QueueError(f"--image {p}: no such file", 2)
        names = [client.upload_image(Path(p)) for p in args.image]
        for node_id, name in zip(loaders, names * len(loaders) if len(names) == 1 else names):
            prompt[node_id].setdefault("inputs", {})["image"] = name
            changes.append(f"{node_id}.image = {name!r}")
    if not args.quiet:
        for line in changes:
            print("set", line)
    progress = None if args.no_wait or args.no_websocket else progress_mod.Progress(client.base, client.client_id, prompt, args.quiet)
    try:
        prompt_id = client.queue(prompt)
        if args.no_wait or not args.quiet:  # with --no-wait the id is the result, so --quiet prints it bare
            print(prompt_id if args.quiet else f"queued {prompt_id}", flush=True)
        if args.no_wait:
            return []
        if progress is not None:
            progress.prompt_id = prompt_id
        entry = wait_for(client, prompt_id, args.timeout, progress, args.quiet)
    finally:
        if progress is not None:
            progress.close()
    images = output_images(entry, args.previews)
    if not images:
        raise QueueError(f"prompt {prompt_id} finished but produced no images (is there a SaveImage node?)")
    saved = save_images(client, images, Path(args.out))
    for path in saved:
        print(f"saved {path}")
    return saved


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except QueueError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print("stopped waiting (the prompt may still run in ComfyUI)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
