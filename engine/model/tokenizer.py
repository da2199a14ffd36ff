"""Tokenizers for models built from a preset (a real checkout brings its own in ``tokenizer/``)."""
from __future__ import annotations

import re

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

# Vocabulary of the offline word-level tokenizer used by the small presets. Real checkouts carry
# their own (CLIP BPE) tokenizer in tokenizer/, which load_components() picks up instead.
_NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()
_BASE_WORDS = (
    "a an the of in on at with and or by for to from this that is are photo picture image drawing "
    "painting sketch portrait style digit number handwritten written black white gray dark light "
    "small large big face person man woman artist art logo sign letter texture pattern crop "
    "flower building sky tree water street cat dog bird car house city landscape close up view "
    "blurry sharp simple detailed high quality low red green blue yellow"
).split()


def build_tokenizer(extra_words: list[str] | tuple[str, ...] = ()):
    """An offline word-level tokenizer (lower-cased, punctuation split) that loads like CLIP's.

    Words outside the vocabulary map to ``<|unk|>``; pass ``extra_words`` (e.g. all caption words
    of a dataset) to cover them.
    """
    specials = ["<|startoftext|>", "<|endoftext|>", "<|unk|>"]
    words: list[str] = []
    for w in [*_NUMBER_WORDS, *_BASE_WORDS, *(x.lower() for x in extra_words)]:
        if w not in words and w not in specials:
            words.append(w)
    words += [str(d) for d in range(10) if str(d) not in words]
    words += [c for c in ",.;:!?'-()" if c not in words]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<|unk|>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        unk_token="<|unk|>", pad_token="<|endoftext|>", model_max_length=77)


def caption_words(captions: list[str]) -> tuple[str, ...]:
    """Distinct lower-cased words of captions, in first-seen order (for build_tokenizer)."""
    seen: dict[str, None] = {}
    for c in captions:
        for w in re.findall(r"[a-z0-9]+", c.lower()):
            seen.setdefault(w, None)
    return tuple(seen)
