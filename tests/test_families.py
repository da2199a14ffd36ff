"""Model families: real shapes on meta, folders in each pipeline's layout, conditioning and the
training objective against diffusers' own pipelines and schedulers."""
import json
import shutil

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
)

from freezeasguard.engine import errors
from freezeasguard.engine.model import components as M
from freezeasguard.engine.model import presets as P
from freezeasguard.engine.model.diffusion import diffusion_loss, make_schedule
from freezeasguard.engine.model.encode import encode_text
from freezeasguard.engine.model.families import detect_family, family_of
from freezeasguard.engine.model.family_dit import image_ids, pack_latents, unpack_latents
from freezeasguard.engine.model.flow import FlowSchedule, dynamic_shift_mu
from freezeasguard.engine.model.sampling import generate

TINY = ["sdxl-tiny", "sd3-tiny", "flux-tiny"]


@pytest.mark.parametrize("preset,tensors,params", [
    ("sdxl", 1_680, 2_567_463_684),  # SDXL base 1.0 UNet
    ("sd3", 682, 2_028_328_000),  # SD3-medium transformer
    ("flux", 1_160, 11_901_408_320),  # FLUX.1 [dev] transformer
])
def test_published_denoisers_have_their_size_on_meta(preset, tensors, params):
    model = P.build_unet(preset, device="meta")
    assert P.param_summary(model) == (tensors, params)
    assert family_of(model).name == P.get_preset(preset).family


@pytest.fixture(scope="module", params=TINY)
def tiny(request, tmp_path_factory):
    c = M.build_components(request.param, seed=1)
    folder = M.save_components(c, tmp_path_factory.mktemp(request.param) / "model")
    return request.param, c, folder


def _batch(c, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, c.latent_channels, c.latent_size, c.latent_size)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), c.schedule.sample_timesteps(n, g)


def test_folder_round_trip(tiny):
    name, c, folder = tiny
    fam = c.family
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == fam.pipeline
    for d in (fam.denoiser_dir, *fam.text_dirs, *fam.tokenizer_dirs, "vae", "scheduler"):
        assert (folder / d).is_dir(), d
    c2 = M.load_components(folder)
    assert c2.family is fam and c2.resolution == c.resolution and len(c2.text_encoders) == len(fam.text_slots)
    sd1, sd2 = c.unet.state_dict(), c2.unet.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    x0, noise, t = _batch(c)
    prompts = ["a photo of a cat", "a painting"]
    with torch.no_grad():
        a = diffusion_loss(c.unet, c.schedule, x0, encode_text(c, prompts), noise, t)
        b = diffusion_loss(c2.unet, c2.schedule, x0, encode_text(c2, prompts), noise, t)
    assert torch.equal(a, b)  # same tensors, same process, same conditioning: the same bits


def test_family_detected_without_model_index(tiny, tmp_path):
    name, c, folder = tiny
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "model_index.json").unlink()
    assert detect_family(copy) is c.family


def test_missing_text_encoder_is_named(tiny, tmp_path):
    name, c, folder = tiny
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / c.family.text_dirs[-1])
    with pytest.raises(errors.ModelError, match=c.family.text_dirs[-1] + "/"):
        M.load_components(copy)


def test_unknown_transformer_class_is_refused(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    with pytest.raises(errors.ModelError, match="WanTransformer3DModel"):
        detect_family(tmp_path)


def _pipeline(c):
    vae, (te, *more), (tok, *toks) = c.vae, c.text_encoders, c.tokenizers
    sched = FlowMatchEulerDiscreteScheduler.from_config(c.schedule.config) if c.family.objective == "flow" else \
        c.schedule.sampler("ddim")
    if c.family.name == "sdxl":
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=more[0], tokenizer=tok,
                                         tokenizer_2=toks[0], unet=c.unet, scheduler=sched)
    if c.family.name == "sd3":
        return StableDiffusion3Pipeline(transformer=c.unet, scheduler=sched, vae=vae, text_encoder=te,
                                        tokenizer=tok, text_encoder_2=more[0], tokenizer_2=toks[0],
                                        text_encoder_3=more[1], tokenizer_3=toks[1])
    return FluxPipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=more[0],
                        tokenizer_2=toks[0], transformer=c.unet)


def test_conditioning_equals_diffusers_pipelines(tiny):
    """Our encoders' outputs are exactly what diffusers' pipeline of the family feeds its denoiser."""
    name, c, _ = tiny
    prompts = ["a photo of a cat", "an oil painting of a harbour"]
    ours = encode_text(c, prompts).tensors
    pipe = _pipeline(c)
    with torch.no_grad():
        if name == "sdxl-tiny":
            emb, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
            assert torch.equal(ours["time_ids"][0], torch.tensor([32.0, 32, 0, 0, 32, 32]))
        elif name == "sd3-tiny":
            emb, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device="cpu",
                                                   do_classifier_free_guidance=False, max_sequence_length=77)
        else:
            emb, pooled, _ = pipe.encode_prompt(prompts, prompts, device="cpu", max_sequence_length=77)
    torch.testing.assert_close(ours["encoder_hidden_states"], emb.float(), rtol=0, atol=0)
    key = "text_embeds" if name == "sdxl-tiny" else "pooled_projections"
    torch.testing.assert_close(ours[key], pooled.float(), rtol=0, atol=0)


def test_flow_matching_matches_diffusers_scheduler():
    cfg = P.get_preset("sd3-tiny").scheduler
    s = FlowSchedule(cfg)
    ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    t = s.sample_timesteps(4096, g)
    assert set(t.tolist()) <= set(ref.timesteps.tolist())  # drawn from the scheduler's own grid
    # shift 3 pushes training toward the noise end: E[sigma] = 0.5 unshifted
    assert (t / 1000).mean() > 0.6
    x0, noise = torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)
    tt = t[:4]
    torch.testing.assert_close(s.add_noise(x0, noise, tt), ref.scale_noise(x0, tt, noise), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.target(x0, noise, tt), noise - x0)
    with pytest.raises(errors.ModelError, match="flow matching"):
        s.with_overrides(prediction_type="epsilon")
    with pytest.raises(errors.ModelError, match="flow-matching scheduler"):
        make_schedule({"_class_name": "DDIMScheduler"}, "flow")
    ln = FlowSchedule(cfg, density="logit_normal").sample_timesteps(4, torch.Generator().manual_seed(0))
    assert ln.shape == (4,)


def test_dynamic_shift_is_fluxs():
    cfg = P.get_preset("flux").scheduler
    assert dynamic_shift_mu(256, cfg) == pytest.approx(0.5) and dynamic_shift_mu(4096, cfg) == pytest.approx(1.15)


def test_flux_packing_is_diffusers_layout():
    x = torch.randn(2, 16, 8, 6)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 16, 8, 6), rtol=0, atol=0)
    assert torch.equal(unpack_latents(packed, 8, 6), x)
    ids = image_ids(8, 6, "cpu", torch.float32)
    torch.testing.assert_close(ids, FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))


@pytest.mark.parametrize("name", TINY)
def test_every_family_learns_a_batch(name):
    """Gradients reach the denoiser through the family's conditioning and objective: 40 Adam steps
    on one fixed batch lower its loss well below the start (the transformers' zero-initialised
    adaLN/output layers start slower than the UNet)."""
    c = M.build_components(name, seed=0)
    x0, noise, t = _batch(c, n=4, seed=1)
    cond = encode_text(c, ["a cat", "a dog", "a tree", "a boat"])
    opt = torch.optim.Adam(c.unet.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = diffusion_loss(c.unet, c.schedule, x0, cond, noise, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


def test_generation_per_family(tiny):
    name, c, _ = tiny
    a = generate(c, ["a cat", "a dog"], steps=3, guidance=2.0, seed=5)
    b = generate(c, ["a cat", "a dog"], steps=3, guidance=2.0, seed=5)
    assert a.shape == (2, 3, c.resolution, c.resolution) and a.dtype == torch.uint8 and torch.equal(a, b)


def test_dit_families_refuse_pixel_space():
    with pytest.raises(errors.ModelError, match="latent space only"):
        P.build_unet("flux-tiny", space="pixel")


def test_attention_backend_keeps_each_familys_processors(tiny):
    """SDPA everywhere on CPU; SD3's joint attention stays joint, Flux's runs through diffusers'
    dispatcher: the prediction is unchanged by setting the backend."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from freezeasguard.engine.model.attention import set_attention_backend

    name, c, _ = tiny
    x0, noise, t = _batch(c)
    cond = encode_text(c, ["a cat", "a dog"])
    with torch.no_grad():
        before = c.family.predict(c.unet, x0, t, cond.tensors)
        assert set_attention_backend(c.unet, "sdpa") == "sdpa"
        after = c.family.predict(c.unet, x0, t, cond.tensors)
    assert torch.equal(before, after)
    if name == "sd3-tiny":
        assert all(isinstance(p, JointAttnProcessor2_0) for p in c.unet.attn_processors.values())
    with pytest.raises(errors.BackendError, match="CUDA"):
        set_attention_backend(c.unet, "xformers")


def test_loads_a_folder_diffusers_wrote(tiny, tmp_path):
    """A checkout as diffusers' own ``save_pretrained`` of the family's pipeline lays it out."""
    name, c, _ = tiny
    _pipeline(c).save_pretrained(tmp_path / "pipe")
    c2 = M.load_components(tmp_path / "pipe")
    assert c2.family is c.family and c2.schedule.prediction_type == c.schedule.prediction_type
    # from the denoiser's sample_size; Flux's config has none, and its default is FLUX.1's 1024 px
    assert c2.resolution == (c.resolution if name != "flux-tiny" else 256)
    sd1, sd2 = c.unet.state_dict(), c2.unet.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    x0, noise, t = _batch(c)
    with torch.no_grad():
        a = diffusion_loss(c.unet, c.schedule, x0, encode_text(c, ["a cat", "a dog"]), noise, t)
        b = diffusion_loss(c2.unet, c2.schedule, x0, encode_text(c2, ["a cat", "a dog"]), noise, t)
    assert torch.equal(a, b)
