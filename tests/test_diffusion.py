"""Noise schedules come from the model folder's scheduler config, as diffusers computes them."""
import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from helpers import tiny_config, tiny_digits

from freezeasguard.engine.errors import ModelError
from freezeasguard.engine.model.components import build_components, load_components, save_components
from freezeasguard.engine.model.diffusion import SD_SCHEDULER, NoiseSchedule
from freezeasguard.engine.model.sampling import generate
from freezeasguard.engine.model.tokenizer import caption_words
from freezeasguard.engine.train.trainer import Trainer

# SD 2.x-style v-prediction with the zero-terminal-SNR fix and trailing timesteps: each of these
# settings changes the targets or the sampler, and a hand-written schedule tends to drop them.
ZERO_SNR = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _folder(tmp_path, **scheduler):
    ds = tiny_digits()
    c = build_components("tiny", extra_words=caption_words(ds.captions), seed=0)
    save_components(c, tmp_path / "model")
    cfg_path = tmp_path / "model" / "scheduler" / "scheduler_config.json"
    cfg = {**json.loads(cfg_path.read_text()), **scheduler}
    cfg_path.write_text(json.dumps(cfg))
    return tmp_path / "model", cfg, ds


def test_trainer_targets_are_diffusers_targets_for_v_prediction_and_zero_snr(tmp_path):
    folder, cfg, ds = _folder(tmp_path, **ZERO_SNR)
    tr = Trainer(tiny_config(tmp_path / "run", f"model.pretrained={folder}"), dataset=ds)
    ref = DDPMScheduler.from_pretrained(folder / "scheduler")  # diffusers, on its own
    assert ref.config.rescale_betas_zero_snr and float(ref.alphas_cumprod[-1]) == 0.0
    assert tr.c.schedule.prediction_type == "v_prediction"

    idx, noise, t, flip, eps = tr._step_inputs(0)
    t = torch.cat([t[:-1], torch.tensor([999])])  # include the zero-SNR step, where x_t is pure noise
    x0, cond = tr.data.batch(idx, flip, eps, tr.device)
    s = tr.c.schedule
    torch.testing.assert_close(s.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=0, atol=0)
    torch.testing.assert_close(s.target(x0, noise, t), ref.get_velocity(x0, noise, t), rtol=0, atol=0)
    torch.testing.assert_close(s.add_noise(x0, noise, t)[-1], noise[-1], rtol=0, atol=0)  # alpha-bar_T = 0

    # The loss of a training step is the MSE against diffusers' target, on the step's own draws.
    idx, noise, t, flip, eps = tr._step_inputs(0)
    x0, cond = tr.data.batch(idx, flip, eps, tr.device)
    with torch.no_grad():
        out = tr.c.unet(ref.add_noise(x0, noise, t), t, encoder_hidden_states=cond.tensors["encoder_hidden_states"],
                         return_dict=False)[0]
        want = F.mse_loss(out.float(), ref.get_velocity(x0, noise, t).float())
    assert tr.train_step().loss == pytest.approx(float(want), rel=1e-6)


def test_every_setting_of_the_config_is_honoured(tmp_path):
    betas = torch.linspace(1e-4, 0.03, 1000).tolist()
    s = NoiseSchedule({**SD_SCHEDULER, "trained_betas": betas})
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - torch.tensor(betas), 0), rtol=1e-6, atol=0)
    trailing = s.with_overrides(timestep_spacing="trailing").sampler()
    trailing.set_timesteps(4)
    assert trailing.timesteps.tolist() == [999, 749, 499, 249]
    leading = s.sampler()  # SD's leading spacing with steps_offset=1
    leading.set_timesteps(4)
    assert leading.timesteps.tolist() == [751, 501, 251, 1]
    with pytest.raises(ModelError, match="prediction_type"):
        NoiseSchedule(prediction_type="flow")
    # a folder's config is used as it is: what it omits takes diffusers' defaults, not SD's
    bare = NoiseSchedule({"_class_name": "DDPMScheduler", "num_train_timesteps": 1000})
    torch.testing.assert_close(bare.alphas_cumprod, DDPMScheduler().alphas_cumprod, rtol=0, atol=0)
    assert bare.config == {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}
    with pytest.raises(ModelError, match="unknown diffusers scheduler 'NoSuchScheduler'"):
        s.sampler("NoSuchScheduler")


def test_folders_round_trip_and_load_in_diffusers(tmp_path):
    folder, cfg, ds = _folder(tmp_path, **ZERO_SNR)
    c = load_components(folder)
    assert c.schedule.config == {**SD_SCHEDULER, **cfg}
    assert isinstance(DDIMScheduler.from_pretrained(folder / "scheduler"), DDIMScheduler)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ModelError, match="scheduler_config.json"):
        load_components(folder)


def test_explicit_prediction_type_overrides_the_folders(tmp_path):
    folder, _, ds = _folder(tmp_path)  # epsilon
    tr = Trainer(tiny_config(tmp_path / "run", f"model.pretrained={folder}", "model.prediction_type=v_prediction"),
                 dataset=ds)
    assert tr.c.schedule.prediction_type == "v_prediction"
    tr.save_final()
    assert load_components(tmp_path / "run" / "final").schedule.prediction_type == "v_prediction"


def test_generate_with_ddim_is_seeded_and_other_samplers_run(tmp_path):
    folder, _, _ = _folder(tmp_path)
    c = load_components(folder)
    a = generate(c, ["a photo of the digit one"] * 2, steps=4, seed=3)
    b = generate(c, ["a photo of the digit one"] * 2, steps=4, seed=3)
    assert a.dtype == torch.uint8 and a.shape == (2, 3, 16, 16) and torch.equal(a, b)
    for name in ("checkout", "DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler"):
        assert generate(c, ["a photo of the digit one"], steps=4, seed=3, sampler=name).shape == (1, 3, 16, 16)
    for steps in (0, 1001):
        with pytest.raises(ModelError, match=r"sampling steps must be in \[1, 1000\]"):
            generate(c, ["a photo of the digit one"], steps=steps)
