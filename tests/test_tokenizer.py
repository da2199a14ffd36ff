"""Tokenizers: Stable Diffusion's CLIP BPE offline, and a word-level fallback that never merges names."""
import logging

import pytest
import torch
from transformers import AutoTokenizer, CLIPTokenizer

from freezeasguard.engine.model import tokenizer as T
from freezeasguard.engine.model.components import build_components
from freezeasguard.engine.model.encode import encode_text

NAMES = ["a photo of Renée", "a photo of René", "a photo of Rene", "a café", "a cafe", "my_style", "my style",
         "Zoë Kravitz", "zoe kravitz"]

needs_clip = pytest.mark.skipif(T.clip_bpe_path() is None, reason="open-clip-torch (its BPE merges) not installed: "
                                "pip install --no-deps open-clip-torch")


@needs_clip
def test_clip_tokenizer_gives_stable_diffusions_ids(tmp_path):
    tok = T.clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == T.CLIP_VOCAB_SIZE and tok.model_max_length == 77 and tok.pad_token_id == 49407
    tok.save_pretrained(tmp_path / "tokenizer")
    for cls in (AutoTokenizer, CLIPTokenizer):  # how a checkout's tokenizer/ is loaded
        again = cls.from_pretrained(tmp_path / "tokenizer")
        assert [again(s).input_ids for s in NAMES] == [tok(s).input_ids for s in NAMES]


@pytest.mark.parametrize("kind", [pytest.param("clip", marks=needs_clip), "word"])
def test_different_names_never_share_a_conditioning(kind):
    c = build_components("tiny", extra_words=T.caption_words(NAMES), tokenizer=kind, seed=0)
    ids = [tuple(c.tokenizer(s).input_ids) for s in NAMES]
    assert len(set(ids)) == len(NAMES), ids
    emb = encode_text(c, NAMES).tensors["encoder_hidden_states"]
    for i in range(len(NAMES)):
        for j in range(i):
            assert not torch.equal(emb[i], emb[j]), (NAMES[i], NAMES[j])


def test_word_tokenizer_has_a_token_for_every_caption_word():
    tok = T.word_tokenizer(T.caption_words(NAMES))
    unk = tok.convert_tokens_to_ids("<|unk|>")
    for s in NAMES:
        assert unk not in tok(s).input_ids, s
    assert T.caption_words(["Renée", "Rene\u0301e"]) == ("renée",)  # composed and decomposed é: one word
    assert tok("my_style").input_ids != tok("my style").input_ids


def test_auto_falls_back_to_words_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(T, "clip_bpe_path", lambda: None)
    T._say_fallback.cache_clear()
    with caplog.at_level(logging.INFO, logger="freezeasguard"):
        tok = T.build_tokenizer(["renée"])
    assert not isinstance(tok, CLIPTokenizer) and "renée" in tok.get_vocab()
    assert "word-level (CLIP's BPE merges not found: pip install --no-deps open-clip-torch)" in caplog.text
    with pytest.raises(FileNotFoundError, match="pip install --no-deps open-clip-torch"):
        T.build_tokenizer(kind="clip")
    with pytest.raises(ValueError, match="tokenizer kind"):
        T.build_tokenizer(kind="bpe")
