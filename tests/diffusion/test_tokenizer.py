"""diffusion.models.tokenizer: the one local tokenizer builder (CLIP BPE in SD1.5's file set, T5 Unigram)."""
import json

from diffusion.models.tokenizer import BOS, EOS, write_clip_tokenizer, write_t5_tokenizer

WORDS = ["Red", "circle", "blue", "background", "with", "red"]


def test_clip_tokenizer_round_trips_with_transformers(tmp_path):
    from transformers import CLIPTokenizer

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")  # as save_pretrained leaves it: removed
    vocab = write_clip_tokenizer(tmp_path / "tok", WORDS, max_length=12)
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == \
        ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert tok.model_max_length == 12 and tok.pad_token == EOS and len(tok) == len(vocab)
    for w in dict.fromkeys(w.lower() for w in WORDS):  # each word one token between BOS and EOS
        assert tok.convert_ids_to_tokens(tok(w).input_ids) == [BOS, w + "</w>", EOS]
    assert tok.decode(tok("Unseen wörds, 42!").input_ids, skip_special_tokens=True) == "unseen wörds , 4 2 !"


def test_clip_pad_token_option(tmp_path):
    from transformers import CLIPTokenizer

    write_clip_tokenizer(tmp_path, WORDS, pad_token="!")  # SDXL's / SD3's second tokenizer
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["pad_token"] == "!"
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok.pad_token == "!" and tok("red", padding="max_length", max_length=5).input_ids[-1] == \
        tok.convert_tokens_to_ids("!")


def test_t5_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    write_t5_tokenizer(tmp_path, WORDS, max_length=16)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.model_max_length == 16 and tok.pad_token_id == 0
    ids = tok("red circle").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["\u2581red", "\u2581circle", "</s>"]
    assert tok.decode(ids, skip_special_tokens=True) == "red circle"
