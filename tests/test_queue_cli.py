"""tools/qwenimage_queue.py against a small fake ComfyUI on 127.0.0.1.

The fake answers /prompt, /queue, /interrupt, /history/<id>, /object_info/<class>, /view,
/upload/image and the /ws websocket the way ComfyUI's server.py does (same JSON shapes), and
records what it was sent. Every wait is bounded.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import struct
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT

PNG = b"\x89PNG\r\n\x1a\nfake image bytes"


def _load_cli():
    spec = importlib.util.spec_from_file_location("qwenimage_queue", ROOT / "tools" / "qwenimage_queue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = _load_cli()
API_WORKFLOWS = sorted((ROOT / "workflows" / "api").glob("*.json"))
# /object_info's "input" of the node types the tests --set (others answer {} as ComfyUI does).
OBJECT_INFO = {
    "QwenImageEmptyLatent": {"required": {"width": ["INT", {}], "height": ["INT", {}], "batch_size": ["INT", {}]},
                             "optional": {"aspect_ratio": [["custom", "1:1 (1328x1328)"], {}]}},
    "SaveImage": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {}]}, "hidden": {"prompt": "PROMPT"}},
}
PARTIAL_NODE_ERRORS = {"4": {
    "errors": [{"type": "value_not_in_list", "message": "Value not in list",
                "details": "controlnet_name: 'missing.safetensors' not in ['union.safetensors']",
                "extra_info": {"input_name": "controlnet_name", "input_config": None, "received_value": "missing.safetensors"}}],
    "dependent_outputs": ["14"], "class_type": "QwenImageControlNetLoader"}}


def ws_frame(op: int, payload: bytes, fin: bool = True) -> bytes:
    """A server frame (unmasked), with the 7-, 16- or 64-bit length as the size needs."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | op])
    head += bytes([n]) if n < 126 else (bytes([126]) + struct.pack(">H", n) if n < 65536 else bytes([127]) + struct.pack(">Q", n))
    return head + payload


def _event(kind, **data):
    return json.dumps({"type": kind, "data": data}).encode()


class FakeComfy:
    """``outcome``: success | error | interrupted | hang | reject | partial (accepted with node_errors)."""

    def __init__(self, outcome="success", polls_before_done=2, websocket=True):
        self.outcome = outcome
        self.polls_before_done = polls_before_done
        self.websocket = websocket
        self.running = None  # True / False: what /queue says about p-1 (None: running until done)
        self.posted: list[dict] = []
        self.control: list[tuple[str, dict]] = []  # POST /queue and /interrupt bodies
        self.uploads: list[bytes] = []
        self.views: list[dict] = []
        self.ws_received: list[tuple[int, bytes]] = []
        self.polls = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _json(self, obj, status=200):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/prompt":
                    body = json.loads(data)
                    fake.posted.append(body)
                    if fake.outcome == "partial":  # the outputs that passed are queued anyway
                        return self._json({"prompt_id": "p-1", "number": 0, "node_errors": PARTIAL_NODE_ERRORS})
                    if fake.outcome == "reject":
                        return self._json({
                            "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}},
                            "node_errors": {"1": {"class_type": "QwenImageDiTLoader", "dependent_outputs": ["9"], "errors": [
                                {"type": "value_not_in_list", "message": "Value not in list",
                                 "details": "model_name: 'missing.safetensors' not in ['a.safetensors']",
                                 "extra_info": {"input_name": "model_name"}}]}},
                        }, 400)
                    return self._json({"prompt_id": "p-1", "number": 0, "node_errors": {}})
                if self.path in ("/queue", "/interrupt"):
                    fake.control.append((self.path, json.loads(data)))
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path == "/upload/image":
                    fake.uploads.append(data)
                    return self._json({"name": "uploaded.png", "subfolder": "", "type": "input"})
                self._json({}, 404)

            def do_GET(self):
                url = urllib.parse.urlparse(self.path)
                if url.path == "/queue":
                    busy = fake.polls < fake.polls_before_done if fake.running is None else fake.running
                    return self._json({"queue_running": [[0, "p-1", {}, {}, []]] if busy else [], "queue_pending": []})
                if url.path.startswith("/object_info/"):
                    name = urllib.parse.unquote(url.path[len("/object_info/"):])
                    return self._json({name: {"input": OBJECT_INFO[name]}} if name in OBJECT_INFO else {})
                if url.path == "/ws" and fake.websocket:
                    return self._websocket()
                if url.path.startswith("/history/"):
                    fake.polls += 1
                    if fake.outcome == "hang" or fake.polls <= fake.polls_before_done:
                        return self._json({})
                    return self._json({"p-1": fake.history_entry()})
                if url.path == "/view":
                    fake.views.append(dict(urllib.parse.parse_qsl(url.query)))
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(PNG)))
                    self.end_headers()
                    self.wfile.write(PNG)
                    return
                self._json({}, 404)

            def _websocket(self):
                key = self.headers["Sec-WebSocket-Key"]
                accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", accept.decode())
                self.end_headers()
                self.wfile.write(b"".join(fake.ws_frames()))
                self.wfile.flush()
                self.close_connection = True
                while True:  # the client's frames (always masked) until its close
                    head = self.rfile.read(2)
                    if len(head) < 2:
                        return
                    n = head[1] & 0x7F
                    if n == 126:
                        n = struct.unpack(">H", self.rfile.read(2))[0]
                    mask = self.rfile.read(4)
                    payload = bytes(c ^ mask[i % 4] for i, c in enumerate(self.rfile.read(n)))
                    fake.ws_received.append((head[0] & 0x0F, payload))
                    if head[0] & 0x0F == 0x8:
                        return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def ws_frames(self) -> list[bytes]:
        """What ComfyUI sends a client running a t2i prompt: status, node starts, steps (one split
        into fragments), a binary preview over 64 KiB, a ping, and another prompt's progress."""
        progress1 = _event("progress", value=1, max=2, prompt_id="p-1", node="7")
        return [
            ws_frame(0x1, _event("status", status={"exec_info": {"queue_remaining": 1}}, sid="x")),
            ws_frame(0x1, _event("execution_cached", nodes=["1", "2"], prompt_id="p-1")),
            ws_frame(0x1, _event("executing", node="7", display_node="7", prompt_id="p-1")),
            ws_frame(0x1, progress1[:20], fin=False), ws_frame(0x0, progress1[20:]),
            ws_frame(0x2, b"\x00\x00\x00\x01" + b"p" * 70000),
            ws_frame(0x9, b"are you there"),
            ws_frame(0x1, _event("progress", value=2, max=2, prompt_id="p-1", node="7")),
            ws_frame(0x1, _event("progress", value=5, max=9, prompt_id="p-other", node="3")),
        ]

    def history_entry(self):
        if self.outcome == "error":
            msg = ("execution_error", {"prompt_id": "p-1", "node_id": "7", "node_type": "QwenImageSampler",
                                       "exception_type": "RuntimeError", "exception_message": "CUDA out of memory"})
            return {"outputs": {}, "status": {"status_str": "error", "completed": False, "messages": [msg]}}
        if self.outcome == "interrupted":
            msg = ("execution_interrupted", {"prompt_id": "p-1", "node_id": "7", "node_type": "QwenImageSampler"})
            return {"outputs": {}, "status": {"status_str": "error", "completed": False, "messages": [msg]}}
        images = [{"filename": "qwen-image_00001_.png", "subfolder": "", "type": "output"},
                  {"filename": "qwen-image_00002_.png", "subfolder": "sub", "type": "output"}]
        preview = [{"filename": "ComfyUI_temp_0001.png", "subfolder": "", "type": "temp"}]
        return {"outputs": {"9": {"images": images}, "12": {"images": preview}},
                "status": {"status_str": "success", "completed": True, "messages": []}}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def fast_polling(monkeypatch):
    monkeypatch.setattr(cli, "POLL_SECONDS", 0.01)


def run_cli(fake, tmp_path, *extra, workflow="qwen_image_t2i"):
    argv = ["--server", fake.url, "--workflow", workflow, "--out", str(tmp_path / "out"), "--no-websocket", "--timeout", "10", *extra]
    return cli.main(argv)


def test_success_applies_overrides_and_saves_images(tmp_path, capsys):
    with FakeComfy() as fake:
        rc = run_cli(fake, tmp_path, "--prompt", "a red fox", "--negative", "blurry", "--seed", "123", "--steps", "4",
                     "--model", "tiny.safetensors", "--text-encoder", "te.safetensors", "--vae", "v.safetensors",
                     "--set", "6.width=64", "--set", "6.aspect_ratio=custom", "--set", "9.filename_prefix=run")
    assert rc == 0, capsys.readouterr().err
    (body,) = fake.posted
    p = body["prompt"]
    assert body["client_id"]
    assert p["4"]["inputs"]["prompt"] == "a red fox"
    assert p["5"]["inputs"]["prompt"] == "blurry"
    assert p["7"]["inputs"]["seed"] == 123 and p["7"]["inputs"]["steps"] == 4
    assert p["1"]["inputs"]["model_name"] == "tiny.safetensors"
    assert p["2"]["inputs"]["text_encoder_name"] == "te.safetensors"
    assert p["3"]["inputs"]["vae_name"] == "v.safetensors"
    assert p["6"]["inputs"]["width"] == 64 and p["6"]["inputs"]["aspect_ratio"] == "custom"
    assert p["9"]["inputs"]["filename_prefix"] == "run"
    saved = sorted((tmp_path / "out").iterdir())
    assert [f.name for f in saved] == ["qwen-image_00001_.png", "qwen-image_00002_.png"]
    assert all(f.read_bytes() == PNG for f in saved)
    assert fake.views[1] == {"filename": "qwen-image_00002_.png", "subfolder": "sub", "type": "output"}
    assert len(fake.views) == 2  # PreviewImage's temp file only with --previews


def test_previews_on_request(tmp_path):
    with FakeComfy() as fake:
        assert run_cli(fake, tmp_path, "--previews") == 0
    assert "ComfyUI_temp_0001.png" in {f.name for f in (tmp_path / "out").iterdir()}
    assert fake.views[-1]["type"] == "temp"


def test_existing_files_are_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "qwen-image_00001_.png").write_bytes(b"old")
    with FakeComfy() as fake:
        assert run_cli(fake, tmp_path) == 0
    assert (tmp_path / "out" / "qwen-image_00001_.png").read_bytes() == b"old"
    assert (tmp_path / "out" / "qwen-image_00001__1.png").read_bytes() == PNG


def test_node_errors_are_reported(tmp_path, capsys):
    with FakeComfy("reject") as fake:
        rc = run_cli(fake, tmp_path, "--model", "missing.safetensors")
    err = capsys.readouterr().err
    assert rc == 1
    assert "node 1 (QwenImageDiTLoader) input 'model_name'" in err and "missing.safetensors" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("outcome,expected", [
    ("error", "failed at node 7 (QwenImageSampler): RuntimeError: CUDA out of memory"),
    ("interrupted", "interrupted at node 7 (QwenImageSampler)"),
])
def test_failed_runs_exit_nonzero(tmp_path, capsys, outcome, expected):
    with FakeComfy(outcome) as fake:
        rc = run_cli(fake, tmp_path)
    assert rc == 1
    assert expected in capsys.readouterr().err


def test_timeout_is_bounded(tmp_path, capsys):
    with FakeComfy("hang") as fake:
        start = time.monotonic()
        rc = run_cli(fake, tmp_path, "--timeout", "0.3")
    assert rc == 3
    assert time.monotonic() - start < 5
    assert "did not finish within 0.3 s" in capsys.readouterr().err


def test_unreachable_server(tmp_path, capsys):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now
    rc = cli.main(["--server", f"127.0.0.1:{port}", "--workflow", "qwen_image_t2i", "--no-websocket", "--out", str(tmp_path)])
    assert rc == 1
    assert "could not reach ComfyUI" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--set", "99.width=64"], "no node '99'"),
    (["--set", "width=64"], "expected NODE_ID.INPUT=VALUE"),
    (["--lora", "a.safetensors"], "no QwenImageLoraLoader node"),
    (["--image", "x.png"], "no LoadImage node"),
])
def test_bad_overrides(tmp_path, capsys, extra, message):
    with FakeComfy() as fake:
        rc = run_cli(fake, tmp_path, *extra)
        assert not fake.posted
    assert rc == 2
    assert message in capsys.readouterr().err


def test_ui_format_and_unknown_workflows_are_refused(tmp_path, capsys):
    with FakeComfy() as fake:
        assert run_cli(fake, tmp_path, workflow=str(ROOT / "workflows" / "qwen_image_t2i.json")) == 2
        assert "UI-format workflow" in capsys.readouterr().err
        assert run_cli(fake, tmp_path, workflow="no_such_workflow") == 2
        assert "qwen_image_t2i" in capsys.readouterr().err  # lists what is bundled
        assert not fake.posted


def test_image_upload_and_repeated_loras(tmp_path):
    wf = {
        "1": {"class_type": "QwenImageLoraLoader", "inputs": {"lora_name": "a.safetensors", "strength": 1.0, "model": ["9", 0]}},
        "2": {"class_type": "QwenImageLoraLoader", "inputs": {"lora_name": "b.safetensors", "strength": 1.0, "model": ["1", 0]}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
    }
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    picture = tmp_path / "in.png"
    picture.write_bytes(PNG)
    with FakeComfy() as fake:
        rc = run_cli(fake, tmp_path, "--lora", "first.safetensors", "--lora", "second.safetensors", "--image", str(picture), workflow=str(path))
    assert rc == 0
    p = fake.posted[0]["prompt"]
    assert p["1"]["inputs"]["lora_name"] == "first.safetensors" and p["2"]["inputs"]["lora_name"] == "second.safetensors"
    assert p["3"]["inputs"]["image"] == "uploaded.png"
    assert b'filename="in.png"' in fake.uploads[0] and PNG in fake.uploads[0]


def test_no_wait_prints_the_prompt_id(tmp_path, capsys):
    with FakeComfy() as fake:
        assert run_cli(fake, tmp_path, "--no-wait") == 0
        assert fake.polls == 0
    assert "queued p-1" in capsys.readouterr().out


@pytest.mark.parametrize("path", API_WORKFLOWS, ids=lambda p: p.name)
def test_every_bundled_workflow_takes_the_common_overrides(path):
    """--prompt and --seed must find their nodes in every bundled workflow."""
    prompt = json.loads(path.read_text(encoding="utf-8"))
    args = cli.build_parser().parse_args(["--workflow", str(path), "--prompt", "x", "--seed", "5"])
    changes = cli.apply_overrides(prompt, args)
    assert any(c.endswith("= 'x'") for c in changes)
    assert any(".seed = 5" in c or ".noise_seed = 5" in c for c in changes)


def test_prompt_follows_pass_through_nodes():
    """--prompt / --negative reach the text behind a ControlNet-apply-like node, and only that text."""
    prompt = {
        "4": {"class_type": "QwenImageTextEncode", "inputs": {"prompt": "pos", "text_encoder": ["2", 0]}},
        "5": {"class_type": "QwenImageTextEncode", "inputs": {"prompt": "neg", "text_encoder": ["2", 0]}},
        "10": {"class_type": "QwenImageControlNetApply", "inputs": {"positive": ["4", 0], "negative": ["5", 0], "strength": 1.0}},
        "11": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["10", 1]}},
        "7": {"class_type": "QwenImageSampler", "inputs": {"positive": ["10", 0], "negative": ["11", 0], "seed": 1}},
    }
    args = cli.build_parser().parse_args(["--workflow", "x", "--prompt", "a cat", "--negative", "blurry"])
    cli.apply_overrides(prompt, args)
    assert prompt["4"]["inputs"]["prompt"] == "a cat"
    assert prompt["5"]["inputs"]["prompt"] == "blurry"


@pytest.mark.parametrize("running", [False, True], ids=["pending", "running"])
def test_partial_acceptance_fails_and_cancels_the_prompt(tmp_path, capsys, running):
    """ComfyUI queues the outputs that passed validation beside node_errors (a missing ControlNet
    file leaves the Canny preview): that is a failure naming the node and input, and the queued
    remainder is taken back (dequeued, and interrupted only when it already runs)."""
    with FakeComfy("partial") as fake:
        fake.running = running
        rc = run_cli(fake, tmp_path, "--previews")
    out, err = capsys.readouterr()
    assert rc == 1
    assert "rejected part of the workflow" in err
    assert "node 4 (QwenImageControlNetLoader) input 'controlnet_name': Value not in list" in err
    assert "missing.safetensors" in err and "blocks output node(s) 14" in err
    assert ("interrupted" if running else "cancelled before it ran") in err
    expected = [("/queue", {"delete": ["p-1"]})] + ([("/interrupt", {"prompt_id": "p-1"})] if running else [])
    assert fake.control == expected
    assert fake.polls == 0 and not fake.views and not (tmp_path / "out").exists()
    assert "queued" not in out


def test_set_refuses_an_input_the_node_does_not_take(tmp_path, capsys):
    with FakeComfy() as fake:
        rc = run_cli(fake, tmp_path, "--set", "6.widht=64")
        assert not fake.posted
    err = capsys.readouterr().err
    assert rc == 2
    assert "node 6 (QwenImageEmptyLatent) has no input 'widht' (did you mean 'width'?)" in err
    assert "its inputs: aspect_ratio, batch_size, height, width" in err


def test_set_accepts_optional_inputs_and_unknown_node_types(tmp_path):
    wf = {
        "6": {"class_type": "QwenImageEmptyLatent", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "SomeOtherPackNode", "inputs": {"images": ["6", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "x"}},
    }
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    with FakeComfy() as fake:
        # optional and not yet in the workflow / a type /object_info does not know (ComfyUI names it)
        assert run_cli(fake, tmp_path, "--set", "6.aspect_ratio=custom", "--set", "8.anything=1", workflow=str(path)) == 0
    p = fake.posted[0]["prompt"]
    assert p["6"]["inputs"]["aspect_ratio"] == "custom" and p["8"]["inputs"]["anything"] == 1


def test_quiet_prints_only_the_saved_files(tmp_path, capsys):
    with FakeComfy() as fake:
        assert run_cli(fake, tmp_path, "--quiet", "--seed", "3") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("saved ") for line in lines), lines
    with FakeComfy() as fake:
        assert run_cli(fake, tmp_path, "--quiet", "--no-wait") == 0
    assert capsys.readouterr().out == "p-1\n"  # the result of --no-wait, bare for scripts


def test_live_progress_over_the_websocket_with_the_standard_library(tmp_path, capsys):
    with FakeComfy(polls_before_done=3) as fake:
        argv = ["--server", fake.url, "--workflow", "qwen_image_t2i", "--out", str(tmp_path / "out"), "--timeout", "10"]
        assert cli.main(argv) == 0, capsys.readouterr().err
        deadline = time.monotonic() + 5
        while not any(op == 0x8 for op, _ in fake.ws_received) and time.monotonic() < deadline:
            time.sleep(0.01)
    out = capsys.readouterr().out
    assert "running node 7 (QwenImageSampler)" in out
    assert "node 7 (QwenImageSampler): step 1/2" in out and "node 7 (QwenImageSampler): step 2/2" in out
    assert "cached: 1, 2" in out
    assert "p-other" not in out and "step 5/9" not in out  # another prompt's progress
    assert (0xA, b"are you there") in fake.ws_received  # the ping was answered
    assert fake.ws_received[-1][0] == 0x8  # and the socket closed cleanly


def test_websocket_accept_key_matches_rfc_6455():
    # The worked example of RFC 6455 section 1.3, independent of the fake above.
    assert cli.progress_mod.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_without_a_websocket_it_says_so_once_and_polls(tmp_path, capsys):
    with FakeComfy(websocket=False) as fake:
        argv = ["--server", fake.url, "--workflow", "qwen_image_t2i", "--out", str(tmp_path / "out"), "--timeout", "10"]
        assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("no live step progress") == 1 and "running" in out
