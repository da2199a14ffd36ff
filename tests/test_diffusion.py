import torch

from freezeasguard.engine.model.diffusion import NoiseSchedule, ddim_sample


def test_schedule_matches_diffusers_ddpm(tmp_path):
    from diffusers import DDPMScheduler

    for pred in ("epsilon", "v_prediction"):
        ours = NoiseSchedule(prediction_type=pred)
        ours.save(tmp_path / pred)
        ref = DDPMScheduler.from_pretrained(tmp_path / pred)  # our folder loads in diffusers
        assert ref.config.prediction_type == pred
        x0, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
        t = torch.tensor([0, 1, 10, 500, 998, 999])
        torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.velocity(x0, noise, t), ref.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-6)
        assert NoiseSchedule.load(tmp_path / pred).prediction_type == pred


def test_ddim_matches_diffusers_ddim():
    from diffusers import DDIMScheduler

    for pred in ("epsilon", "v_prediction"):
        ours = NoiseSchedule(prediction_type=pred)
        ref = DDIMScheduler(**{k: v for k, v in ours.config().items() if not k.startswith("_")})
        ref.set_timesteps(20)
        w = torch.randn(4, 4, 8, 8)

        def model(x, t):  # any deterministic function of (x, t)
            return torch.tanh(x * 0.5 + w * (t.float().view(-1, 1, 1, 1) / 1000))

        x_T = torch.randn(4, 4, 8, 8)
        x = x_T.clone()
        for t in ref.timesteps:
            x = ref.step(model(x, t.repeat(4)), t, x).prev_sample
        ours_out = ddim_sample(model, ours, x_T, steps=20)
        torch.testing.assert_close(ours_out, x, rtol=1e-4, atol=1e-5)
