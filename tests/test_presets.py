import pytest
import torch

from freezeasguard.engine import errors
from freezeasguard.engine.model import components as M
from freezeasguard.engine.model import presets as P


def test_sd15_unet_has_the_published_size_on_meta():
    unet = P.build_unet("sd15", device="meta")
    assert P.param_summary(unet) == (686, 859_520_964)
    assert all(p.device.type == "meta" for p in unet.parameters())


def test_preset_sizes():
    assert P.param_summary(P.build_unet("sd21", device="meta")) == (686, 865_910_724)
    n_t, n_p = P.param_summary(P.build_unet("small", device="meta"))
    assert n_t == 686 and 10e6 <= n_p <= 30e6  # SD1.5's block structure at CPU size
    assert P.param_summary(P.build_unet("tiny", device="meta"))[1] < 1e6
    with pytest.raises(errors.ModelError, match="unknown model preset 'sd4'"):
        P.build_unet("sd4")


def test_offline_word_tokenizer_and_text_encoder():
    c = M.build_components("tiny", extra_words=("zebra",), tokenizer="word")
    ids = c.tokenizer(["A photo of the digit Seven, zebra!"]).input_ids[0]
    unk = c.tokenizer.unk_token_id
    assert ids[0] == c.tokenizer.bos_token_id and ids[-1] == c.tokenizer.eos_token_id
    assert unk not in ids
    assert c.tokenizer(["qwxyz"]).input_ids[0][1] == unk
    emb = c.text_encoder(torch.tensor([ids]))[0]
    assert emb.shape == (1, len(ids), c.text_encoder.config.hidden_size)


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_folder_round_trip_and_generation(tmp_path, space):
    from freezeasguard.engine.model.sampling import generate

    c = M.build_components("tiny", space=space, resolution=16, seed=3)
    M.save_components(c, tmp_path / "model")
    for d in ("unet", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "model" / d).is_dir()
    assert (tmp_path / "model" / "vae").is_dir() == (space == "latent")
    c2 = M.load_components(tmp_path / "model")
    assert c2.space == space and c2.resolution == 16
    for (n, a), (_, b) in zip(c.unet.state_dict().items(), c2.unet.state_dict().items()):
        assert torch.equal(a, b), n
    prompts = ["a photo of the digit one", "a photo of the digit two"]
    assert c2.tokenizer(prompts).input_ids == c.tokenizer(prompts).input_ids
    img1 = generate(c, prompts, steps=3, seed=1)
    img2 = generate(c2, prompts, steps=3, seed=1)
    assert img1.shape == (2, 3, 16, 16) and img1.dtype == torch.uint8
    # same weights and seed; float reductions may differ by layout, so one uint8 step at most
    assert (img1.int() - img2.int()).abs().max() <= 1


def test_missing_folder_parts_are_named(tmp_path):
    (tmp_path / "m" / "unet").mkdir(parents=True)
    with pytest.raises(errors.ModelError, match="text_encoder/, tokenizer/"):
        M.load_components(tmp_path / "m")
    with pytest.raises(errors.ModelError, match="does not exist"):
        M.load_components(tmp_path / "nope")
