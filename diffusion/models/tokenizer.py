"""Local tokenizers built from a word list (no downloads): the one builder behind the tiny SD / SDXL / SD3 fixtures
(scripts/make_tiny_sd*.py) and the text-to-image task, and the fill fixture's vocabulary they share (FILL_WORDS: the
named PALETTE colours of scripts/make_fill_dataset.py, its prompt words and a few common ones).

write_clip_tokenizer writes a CLIP byte-level BPE tokenizer directory in SD1.5's file set (vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json; no tokenizer.json), loaded by transformers' CLIPTokenizer: the byte
alphabet + "</w>" word ends + merges learned until every listed word is one token, so any text tokenizes.
write_t5_tokenizer writes a T5-style Unigram tokenizer over the same words (SD3's third text encoder).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["BOS", "EOS", "PALETTE", "PROMPT_WORDS", "EXTRA_WORDS", "FILL_WORDS", "byte_alphabet", "build_bpe",
           "write_clip_tokenizer", "write_t5_tokenizer"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# The fill fixture's named colours (RGB), single words so prompts stay in a tiny vocabulary; the fill images are drawn
# from them (scripts/make_fill_dataset.py) and a generated image's colours are checked against them (eval_default).
PALETTE = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "cyan": (30, 210, 220), "magenta": (210, 40, 200), "orange": (245, 140, 20), "purple": (120, 40, 170),
    "pink": (250, 160, 190), "brown": (130, 80, 30), "white": (245, 245, 245), "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
PROMPT_WORDS = ("circle", "with", "background")  # every fill prompt is "<colour> circle with <colour> background"
EXTRA_WORDS = ("a", "an", "the", "of", "and", "on", "in", "photo", "image", "picture", "small", "large", "big",
               "dark", "light", "bright", "colored", "circles", "square", "ring", "edge", "edges", "outline")
FILL_WORDS = (*PALETTE, *PROMPT_WORDS, *EXTRA_WORDS)  # the tokenizers' word list: each of these is one token


def byte_alphabet() -> list[str]:
    """The byte -> printable-unicode map of byte-level BPE (Radford et al. 2019): printable Latin-1 bytes map to
    themselves, the other bytes to code points from 256 on, in byte order. Returns the 256 symbols by byte value."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1))
    keep |= set(range(ord("®"), ord("ÿ") + 1))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def build_bpe(words: Sequence[str]) -> tuple[dict, list[str]]:
    """CLIP-style vocab (bytes, bytes+'</w>', merged pieces, BOS, EOS) and merges learned by BPE training
    (Sennrich et al. 2016: repeatedly merge the most frequent adjacent pair) until every word is one symbol."""
    alpha = byte_alphabet()
    tokens = alpha + [a + "</w>" for a in alpha]
    segs = []
    for word in dict.fromkeys(w.lower() for w in words):
        syms = [alpha[b] for b in word.encode("utf-8")]
        syms[-1] += "</w>"
        segs.append(syms)
    merges = []
    while True:
        counts: dict = {}
        for syms in segs:
            for pair in zip(syms[:-1], syms[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], [-ord(c) for c in p[0] + " " + p[1]]))  # ties: lexicographic
        merges.append(f"{best[0]} {best[1]}")
        tokens.append(best[0] + best[1])
        for syms in segs:
            i = 0
            while i < len(syms) - 1:
                if (syms[i], syms[i + 1]) == best:
                    syms[i:i + 2] = [syms[i] + syms[i + 1]]
                i += 1
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(path, words: Sequence[str], max_length: int = 77, pad_token: Optional[str] = None) -> dict:
    """CLIP tokenizer directory over `words` in SD1.5's file set (a tokenizer.json left by save_pretrained is
    removed, so loading goes through vocab.json + merges.txt); `pad_token` defaults to EOS (SD1.5; SDXL's and SD3's
    second tokenizer pad with "!"). Returns the vocabulary (token -> id)."""
    vocab, merges = build_bpe(words)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").unlink(missing_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token or EOS}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
         "errors": "replace", "add_prefix_space": False, **special}, indent=2))
    return vocab


def write_t5_tokenizer(path, words: Sequence[str], max_length: int = 256):
    """A T5-style Unigram tokenizer (SentencePiece conventions: "▁" word starts, </s> appended, <pad> = 0) over the
    given words plus single printable characters, so any text tokenizes; saved as tokenizer.json. Returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in dict.fromkeys(w.lower() for w in words)]
    pieces += [(chr(c), -5.0) for c in range(33, 127)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
                         model_max_length=max_length)
    t5.save_pretrained(path)
    return t5
