"""The frontend extension's JavaScript, run with Node's test runner (skipped without `node`)."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from conftest import ROOT

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


def test_node_unit_tests():
    files = sorted(str(p) for p in (ROOT / "tests" / "js").glob("*.test.mjs"))
    assert files, "no tests in tests/js"
    result = subprocess.run([NODE, "--test", *files], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


def test_backend_presets_parse_in_the_frontend():
    """The frontend reads sizes out of the backend's preset labels: every label must parse to its size."""
    from qwenimage_pack.nodes.latents import ASPECT_PRESETS, CUSTOM

    labels = [CUSTOM, *ASPECT_PRESETS]
    module = (ROOT / "js" / "lib" / "aspect_ratio.js").as_uri()
    script = (
        f"import {{ parsePreset }} from {json.dumps(module)};"
        f"console.log(JSON.stringify({json.dumps(labels)}.map(parsePreset)));"
    )
    result = subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    parsed = json.loads(result.stdout)
    assert parsed[0] is None
    assert [(p["width"], p["height"]) for p in parsed[1:]] == list(ASPECT_PRESETS.values())
