"""Sigmas and sampling math against diffusers' FlowMatchEulerDiscreteScheduler (Qwen-Image config)."""
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from qwenimage_pack.core.pipeline import sampling as fm
from qwenimage_pack.core.pipeline import schedule

# Qwen/Qwen-Image scheduler/scheduler_config.json
QWEN_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=math.log(3), invert_sigmas=False, max_image_seq_len=8192,
    max_shift=math.log(3), num_train_timesteps=1000, shift=1.0, shift_terminal=None,
    stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
    use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False,
)
QWEN_SCHEDULER.update(base_shift=0.5, max_shift=0.9, shift_terminal=0.02)


def reference_sigmas(steps, seq_len, config=QWEN_SCHEDULER):
    sched = FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(seq_len, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"], config["max_shift"])
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sched.sigmas, mu


@pytest.mark.parametrize("side,steps", [(1024, 50), (1328, 50), (1024, 4), (1664, 20), (512, 2)])
def test_dynamic_sigmas_match_diffusers(side, steps):
    seq = schedule.image_seq_len(side // 8, side // 8)
    ref, mu = reference_sigmas(steps, seq)
    assert schedule.dynamic_mu(seq) == pytest.approx(mu, abs=1e-12)
    ours = schedule.flow_sigmas(steps, "dynamic", seq_len=seq)
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=2e-6)


def test_known_values():
    assert schedule.dynamic_mu(4096) == pytest.approx(0.693548, abs=1e-6)
    assert schedule.dynamic_mu(83 * 83) == pytest.approx(0.834325, abs=1e-6)
    s = schedule.flow_sigmas(50, "dynamic", seq_len=4096)
    assert s[:3].tolist() == pytest.approx([1.0, 0.989701, 0.979191], abs=2e-6)
    assert s[-2].item() == pytest.approx(0.02, abs=1e-6) and s[-1].item() == 0.0


@pytest.mark.parametrize("steps,expected", [
    (4, [1, 0.9, 0.75, 0.5, 0]),
    (8, [1, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0]),
])
def test_lightning_constant_shift(steps, expected):
    # Lightning's scheduler: dynamic shifting with base_shift = max_shift = ln 3, no terminal stretch.
    config = dict(QWEN_SCHEDULER, base_shift=math.log(3), max_shift=math.log(3), shift_terminal=None)
    ref, _ = reference_sigmas(steps, 4096, config)
    ours = schedule.flow_sigmas(steps, "constant", shift=3.0)
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=2e-6)
    assert ours.tolist() == pytest.approx(expected, abs=1e-4)


def test_one_step_is_finite():
    s = schedule.flow_sigmas(1, "dynamic", seq_len=4096)
    assert torch.isfinite(s).all() and s.tolist() == [1.0, 0.0]


def test_denoise_start_matches_diffusers_img2img():
    for steps in (4, 10, 30, 50):
        for strength in (0.0, 0.25, 0.6, 0.75, 0.999, 1.0):
            init = min(steps * strength, steps)
            assert schedule.denoise_start(steps, strength) == int(max(steps - init, 0))
    with pytest.raises(ValueError):
        schedule.denoise_start(10, 1.5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        schedule.flow_sigmas(0)
    with pytest.raises(ValueError, match="shift_mode"):
        schedule.flow_sigmas(4, "karras")


def test_euler_step_matches_scheduler_step():
    steps = 6
    seq = 64
    ref_sigmas, mu = reference_sigmas(steps, seq)
    sched = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, 16, 16, generator=g)
    vels = [torch.randn(1, 16, 16, 16, generator=g) for _ in range(steps)]
    x_ref = noise.clone()
    for i, t in enumerate(sched.timesteps):
        x_ref = sched.step(vels[i], t, x_ref, return_dict=False)[0]
    calls = iter(vels)
    x = fm.euler_sample(lambda x, s: next(calls), torch.zeros_like(noise), noise, schedule.flow_sigmas(steps, seq_len=seq))
    torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-5)


def test_noise_matches_diffusers_randn():
    from diffusers.utils.torch_utils import randn_tensor

    for seed, batch in ((0, 1), (1234, 2)):
        ref = randn_tensor((batch, 1, 16, 10, 12), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
        assert torch.equal(fm.initial_noise(seed, batch, 10, 12), ref[:, 0])


def test_true_cfg_matches_diffusers_formula():
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(2, 16, 6, 8, generator=g), torch.randn(2, 16, 6, 8, generator=g)
    from qwenimage_pack.core.pipeline.latent_format import pack, unpack

    pc, pu = pack(cond), pack(uncond)
    comb = pu + 4.0 * (pc - pu)
    ref = comb * (torch.norm(pc, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    torch.testing.assert_close(fm.true_cfg(cond, uncond, 4.0), unpack(ref, 6, 8), rtol=1e-6, atol=1e-6)


def test_mask_keeps_outside_exactly():
    noise = torch.randn(1, 16, 8, 8)
    clean = torch.randn(1, 16, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 3:7] = 1
    out = fm.euler_sample(lambda x, s: torch.randn_like(x), clean, noise, schedule.flow_sigmas(5, seq_len=16), mask=mask)
    assert torch.equal(out[..., mask[0, 0] == 0], clean[..., mask[0, 0] == 0])
    assert not torch.allclose(out[..., mask[0, 0] == 1], clean[..., mask[0, 0] == 1])


def test_latent_mask_resizes_and_broadcasts():
    m = fm.latent_mask(torch.ones(64, 48), batch=3, h=8, w=6)
    assert m.shape == (3, 1, 8, 6) and bool((m == 1).all())
    with pytest.raises(ValueError):
        fm.latent_mask(torch.ones(2, 8, 8), batch=3, h=8, w=8)


def test_latent_mask_of_other_proportions_is_refused():
    with pytest.raises(ValueError, match="proportions"):
        fm.latent_mask(torch.ones(1, 64, 128), batch=1, h=8, w=8)
    # pixel masks of the same image round onto the grid
    assert fm.latent_mask(torch.ones(1, 1001, 767), batch=1, h=125, w=96).shape == (1, 1, 125, 96)
