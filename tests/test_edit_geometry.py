"""Edit sizing: the reference formulas at full size, grids that line up, results returned at
the input's exact size, and the handling of odd inputs. No models needed."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from qwenimage_pack.core.pipeline import edit as E

# official aspect ratios, odd sizes, extreme-ish ratios, tiny and huge
SIZES = [(1328, 1328), (1664, 928), (928, 1664), (1472, 1104), (1104, 1472), (1584, 1056), (1056, 1584),
         (1920, 1080), (333, 517), (517, 333), (1001, 999), (4000, 3000), (8000, 8000), (17, 23), (640, 31),
         (3000, 200)]


def test_reference_sizes_match_diffusers():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions as d_edit
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions as d_plus

    for w, h in SIZES:
        r = w / h
        assert E.calculate_dimensions(1024 * 1024, r) == d_edit(1024 * 1024, r)[:2]
        assert E.calculate_dimensions(384 * 384, r) == d_plus(384 * 384, r)
    assert E.calculate_dimensions(1024 * 1024, 16 / 9) == (1376, 768)


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    for w, h in SIZES + [(1024, 1024), (384, 384), (5000, 4000), (10, 10)]:
        assert E.smart_resize(h, w) == smart_resize(h, w, 28, E.MIN_PIXELS, E.MAX_PIXELS), (w, h)
    assert E.smart_resize(1024, 1024) == (1036, 1036)  # 37 x 37 merged tokens = 1369


@pytest.mark.parametrize("mode", E.SIZING_MODES)
@pytest.mark.parametrize("kind", E.KINDS)
def test_output_grid_is_the_reference_grid(mode, kind):
    for w, h in SIZES:
        plan = E.plan_image(w, h, kind, mode)
        vw, vh = plan.vae
        step = 32 if mode == "reference" else 16
        assert vw % step == 0 and vh % step == 0
        # the output latent is the last image's reference latent, token for token
        out = E.output_size([E.plan_image(640, 480, kind, mode), plan])
        assert out == plan.vae
        assert (out[0] // 16, out[1] // 16) == (vw // 16, vh // 16)
        if min(w, h) >= 200:
            assert 0.7 * 1024 ** 2 < vw * vh < 1.3 * 1024 ** 2
        if kind == "edit":
            assert plan.vision == plan.vae
        sh, sw = E.smart_resize(plan.vision[1], plan.vision[0])
        assert sh % 28 == 0 and sw % 28 == 0


def test_preserve_mode_keeps_the_aspect_ratio_better():
    for w, h in SIZES:
        if min(w, h) < 200:
            continue
        pw, ph = E.plan_image(w, h, "edit", "preserve").vae
        rw, rh = E.plan_image(w, h, "edit", "reference").vae
        err_p = abs(math.log((pw / ph) / (w / h)))
        err_r = abs(math.log((rw / rh) / (w / h)))
        assert err_p <= err_r + 1e-9, (w, h)
        # one 16-pixel rounding step on each side at most
        assert abs(pw / w - ph / h) <= 8 / w + 8 / h + 1e-9


def _centroid(img: torch.Tensor) -> tuple[float, float]:
    m = img[..., 0]
    ys, xs = torch.meshgrid(torch.arange(m.shape[0], dtype=torch.float64),
                            torch.arange(m.shape[1], dtype=torch.float64), indexing="ij")
    total = m.double().sum()
    return float((xs * m).sum() / total), float((ys * m).sum() / total)


@pytest.mark.parametrize("w,h", [(517, 333), (333, 517), (1001, 999), (640, 31 * 4)])
def test_decoded_image_maps_back_onto_the_input(w, h):
    """What the model sees (the VAE copy) and what comes back (Match Size) line up with the
    input: a small spot keeps its position to a fraction of a pixel, the size is exact."""
    from qwenimage_pack.nodes.edit import QwenImageMatchSize

    img = torch.zeros(h, w, 3)
    x0, y0 = int(w * 0.3), int(h * 0.6)
    img[y0:y0 + 9, x0:x0 + 9] = 1.0
    img = (img * 255).round() / 255
    plan = E.plan_image(w, h, "edit", "preserve")
    copy = E.resize_image(img, *plan.vae)
    cx, cy = _centroid(img)
    sx, sy = plan.vae[0] / w, plan.vae[1] / h
    ccx, ccy = _centroid(copy.clamp(min=0))
    assert abs(ccx - ((cx + 0.5) * sx - 0.5)) < 0.25 and abs(ccy - ((cy + 0.5) * sy - 0.5)) < 0.25
    back = QwenImageMatchSize().match(copy[None], img[None])[0]
    assert back.shape == (1, h, w, 3)
    bx, by = _centroid(back[0].clamp(min=0))
    assert abs(bx - cx) < 0.25 and abs(by - cy) < 0.25


def test_resize_keeps_16_bit_precision_and_8_bit_exactness():
    from PIL import Image
    import numpy as np

    g = torch.Generator().manual_seed(0)
    img8 = torch.randint(0, 256, (37, 53, 3), generator=g).float() / 255
    ref = np.asarray(Image.fromarray((img8 * 255).round().byte().numpy(), "RGB").resize((40, 24), resample=1))
    assert torch.equal(E.resize_image(img8, 40, 24), torch.from_numpy(ref.astype(np.float32) / 255))
    img16 = torch.randint(0, 65536, (37, 53, 3), generator=g).float() / 65535
    out = E.resize_image(img16, 40, 24)
    assert not E.is_8bit(out) and out.shape == (24, 40, 3)


# ---------------------------------------------------------------------------------------
# odd inputs


def test_odd_images_are_handled_or_refused_clearly(caplog):
    from qwenimage_pack.nodes.edit import prepare_image

    rgba = torch.rand(1, 40, 30, 4)
    assert torch.equal(prepare_image(rgba, "image1"), rgba[0, ..., :3])
    gray = torch.rand(1, 40, 30, 1)
    assert prepare_image(gray, "image1").shape == (40, 30, 3)
    sixteen = torch.randint(0, 32767, (1, 40, 30, 3), dtype=torch.int16)
    got = prepare_image(sixteen, "image2")
    assert 0 <= float(got.min()) and float(got.max()) <= 1
    with caplog.at_level(logging.WARNING, logger="qwenimage"):
        batch = torch.rand(3, 40, 30, 3)
        assert torch.equal(prepare_image(batch, "image1"), batch[0])
        assert "batch of 3" in caplog.text
        prepare_image(torch.full((1, 20, 20, 3), 1.5), "image3")
        assert "clamped" in caplog.text
        prepare_image(torch.zeros(1, 4200, 4200, 3, dtype=torch.uint8), "image1")
        assert "scaled down" in caplog.text
    with pytest.raises(ValueError, match="image1 is 1x1 pixels"):
        prepare_image(torch.zeros(1, 1, 1, 3), "image1")
    with pytest.raises(ValueError, match="image2: expected 1, 3 or 4 channels"):
        prepare_image(torch.zeros(1, 20, 20, 5), "image2")
    with pytest.raises(ValueError, match="NaN"):
        prepare_image(torch.full((1, 20, 20, 3), float("nan")), "image1")
    with pytest.raises(ValueError, match="too elongated"):
        E.plan_image(10000, 20, "edit", "preserve")
    assert E.plan_image(8000, 8000, "edit_plus", "preserve").vae == (1024, 1024)


def test_text_encoder_without_vision_tower_names_the_fix():
    from qwenimage_pack.nodes.edit import vision_tower_for
    from qwenimage_pack.nodes.handles import TextEncoder

    te = TextEncoder(module=torch.nn.Linear(1, 1), tokenizer=None, name="Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf", vision=None)
    with pytest.raises(ValueError, match="mmproj"):
        vision_tower_for(te)


def test_variant_choice():
    from qwenimage_pack.nodes.edit import pick_kind

    assert pick_kind("auto", 1) == "edit" and pick_kind("auto", 2) == "edit_plus"
    assert pick_kind("edit-plus", 1) == "edit_plus"
    with pytest.raises(ValueError, match="takes one image"):
        pick_kind("edit", 3)


def test_inpaint_mask_must_fit_the_image():
    from qwenimage_pack.nodes.edit import QwenImageInpaintMask

    latent = {"samples": torch.zeros(1, 16, 64, 96)}  # a 768x512 image
    out = QwenImageInpaintMask().apply(latent, torch.ones(512, 768))[0]
    assert out["noise_mask"].shape == (1, 1, 512, 768)
    QwenImageInpaintMask().apply(latent, torch.ones(1, 256, 384))  # same shape, other resolution: fine
    with pytest.raises(ValueError, match="mask is 512x512 pixels but the latent is for a 768x512 image"):
        QwenImageInpaintMask().apply(latent, torch.ones(512, 512))


def test_inpaint_mask_says_when_nothing_was_painted():
    """An RGB photo without alpha gives LoadImage's 64x64 all-zero placeholder: the message names the
    real cause and how to paint a mask, not "the mask of another image"."""
    from qwenimage_pack.nodes.edit import QwenImageInpaintMask

    for latent in ({"samples": torch.zeros(1, 16, 64, 96)}, {"samples": torch.zeros(1, 16, 128, 128)}):  # 768x512, square 1024
        with pytest.raises(ValueError, match="no alpha channel and no mask was painted") as err:
            QwenImageInpaintMask().apply(latent, torch.zeros(1, 64, 64))
        assert "right-click the LoadImage node > Open in MaskEditor" in str(err.value)
    latent = {"samples": torch.zeros(1, 16, 64, 96)}
    painted = torch.zeros(1, 64, 64)
    painted[0, 10:20, 10:20] = 1.0
    with pytest.raises(ValueError, match="mask is 64x64 pixels but the latent is for a 768x512 image"):
        QwenImageInpaintMask().apply(latent, painted)  # a painted mask of another image: still refused
    tiny = {"samples": torch.zeros(1, 16, 8, 8)}  # a 64x64 image: its own empty mask is no placeholder
    assert QwenImageInpaintMask().apply(tiny, torch.zeros(64, 64))[0]["noise_mask"].shape == (1, 1, 64, 64)
