"""Tokenizers for models built from a preset (a real checkout brings its own in ``tokenizer/``).

* ``clip_tokenizer``: the tokenizer Stable Diffusion checkouts use (CLIP's byte-level BPE: 49,408
  entries, the same ids as SD's ``tokenizer/``), built offline from the BPE merges that ship inside
  the ``open-clip-torch`` wheel (``open_clip/bpe_simple_vocab_16e6.txt.gz``; install it with
  ``pip install --no-deps open-clip-torch``: its dependencies would replace this torch). The
  package is located, never imported.
* ``word_tokenizer``: the fallback without that file: one token per caption word (Unicode-aware:
  "Renée", "café" and "my_style" are words of their own), so two different captions never share
  a conditioning unless they differ only in case.

Both load like CLIP's tokenizer (``<|startoftext|>``/``<|endoftext|>``, 77 positions, padded with
``<|endoftext|>``) and are saved into a model folder's ``tokenizer/`` by ``save_pretrained``.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import CLIPTokenizer, PreTrainedTokenizerFast

from freezeasguard.engine.errors import ModelError

log = logging.getLogger("freezeasguard")

CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49_408
_CLIP_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2  # 48,894: the byte symbols, their </w> forms, two specials
SPECIALS = ("<|startoftext|>", "<|endoftext|>")
MAX_LENGTH = 77

# The word-level vocabulary always holds these; a dataset's caption words are added to them.
_NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()
_BASE_WORDS = (
    "a an the of in on at with and or by for to from this that is are photo picture image drawing "
    "painting sketch portrait style digit number handwritten written black white gray dark light "
    "small large big face person man woman artist art logo sign letter texture pattern crop "
    "flower building sky tree water street cat dog bird car house city landscape close up view "
    "blurry sharp simple detailed high quality low red green blue yellow"
).split()


def clip_bpe_path() -> Path | None:
    """Where open-clip-torch's CLIP BPE merges lie (None when the wheel is not installed)."""
    spec = importlib.util.find_spec("open_clip")  # a top-level package: located, not imported
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / CLIP_BPE_FILE
    return path if path.is_file() else None


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE, in byte order: printable Latin-1 bytes stand
    for themselves, the other 68 bytes for code points 256 and up, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    order = printable + [b for b in range(256) if b not in printable]  # CLIP's vocabulary order
    return [symbols[b] for b in order]


@functools.lru_cache(maxsize=1)
def _clip_vocab(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:1 + _CLIP_MERGES]]  # line 0 is a version header
    symbols = _byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), *SPECIALS]
    if len(tokens) != CLIP_VOCAB_SIZE or len(set(tokens)) != CLIP_VOCAB_SIZE:
        raise ModelError(f"{path} does not hold CLIP's merges (vocabulary of {len(set(tokens))} entries, expected "
                         f"{CLIP_VOCAB_SIZE}); reinstall open-clip-torch")
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer() -> CLIPTokenizer:
    """Stable Diffusion's tokenizer ("a photo of a cat" -> 49406 320 1125 539 320 2368 49407)."""
    path = clip_bpe_path()
    if path is None:
        raise FileNotFoundError(f"CLIP's BPE merges ({CLIP_BPE_FILE}) ship in the open-clip-torch wheel: "
                                "pip install --no-deps open-clip-torch")
    vocab, merges = _clip_vocab(path)
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_LENGTH)


def _word_pipeline() -> Tokenizer:
    tok = Tokenizer(WordLevel({"<|unk|>": 0}, unk_token="<|unk|>"))
    # NFC first, so a composed and a decomposed "é" are the same word; punctuation (the underscore
    # included) splits off as tokens of its own.
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return tok


def caption_words(captions: list[str]) -> tuple[str, ...]:
    """Distinct words of captions as the word-level tokenizer splits them, in first-seen order."""
    pipe = _word_pipeline()
    seen: dict[str, None] = {}
    for c in captions:
        for w, _ in pipe.pre_tokenizer.pre_tokenize_str(pipe.normalizer.normalize_str(c)):
            seen.setdefault(w, None)
    return tuple(seen)


def word_tokenizer(extra_words: list[str] | tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """An offline word-level tokenizer that loads like CLIP's; words outside its vocabulary map to
    ``<|unk|>``, so pass every caption word of the data (``caption_words``)."""
    specials = [*SPECIALS, "<|unk|>"]
    words: dict[str, None] = {}
    for w in [*_NUMBER_WORDS, *_BASE_WORDS, *caption_words(list(extra_words)), *map(str, range(10)),
              *",.;:!?'-()_"]:
        if w not in specials:
            words.setdefault(w, None)
    vocab = {tok: i for i, tok in enumerate([*specials, *words])}
    tok = _word_pipeline()
    tok.model = WordLevel(vocab, unk_token="<|unk|>")
    bos, eos = vocab[SPECIALS[0]], vocab[SPECIALS[1]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIALS[0]} $A {SPECIALS[1]}", special_tokens=[(SPECIALS[0], bos), (SPECIALS[1], eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1],
                                   unk_token="<|unk|>", pad_token=SPECIALS[1], model_max_length=MAX_LENGTH)


@functools.lru_cache(maxsize=1)
def _say_fallback() -> None:
    log.info("tokenizer: word-level (CLIP's BPE merges not found: pip install --no-deps open-clip-torch)")


def build_tokenizer(extra_words: list[str] | tuple[str, ...] = (), kind: str = "auto"):
    """The tokenizer of a model built from a preset.

    Args:
        extra_words: words the word-level tokenizer must know (a dataset's ``caption_words``);
            CLIP's BPE knows every string already.
        kind: 'clip', 'word', or 'auto' (CLIP's where its merges are installed, else word-level).
    """
    if kind not in ("auto", "clip", "word"):
        raise ValueError(f"tokenizer kind must be 'auto', 'clip' or 'word', got {kind!r}")
    if kind == "clip" or (kind == "auto" and clip_bpe_path() is not None):
        return clip_tokenizer()
    if kind == "auto":
        _say_fallback()
    return word_tokenizer(extra_words)
