"""Frozen text encoder: tokenizer + CLIPTextModel -> (token features, pooled features); a tiny local one for tests."""
from __future__ import annotations

from pathlib import Path

import torch


class TextEncoder(torch.nn.Module):
    """Frozen tokenizer + CLIPTextModel: texts -> (last hidden states (B, L, D), pooled (B, D))."""

    def __init__(self, tokenizer, model, max_length: int | None = None):
        super().__init__()
        self.tokenizer, self.model = tokenizer, model.eval().requires_grad_(False)
        self.max_length = max_length or model.config.max_position_embeddings
        self.hidden_size = model.config.hidden_size

    @classmethod
    def tiny(cls, words, hidden_size: int = 64, layers: int = 2, heads: int = 2, max_length: int = 16,
             seed: int = 0) -> "TextEncoder":
        """Word-level tokenizer over `words` + a small random CLIPTextModel, built locally."""
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
        from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

        special = ["<pad>", "<bos>", "<unk>", "<eos>"]  # eos id 3: CLIP pools at the first eos token
        vocab = {w: i for i, w in enumerate(special + sorted({w.lower() for w in words} - set(special)))}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 3)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                            pad_token="<pad>", unk_token="<unk>", model_max_length=max_length)
        config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                                num_hidden_layers=layers, num_attention_heads=heads,
                                max_position_embeddings=max_length, pad_token_id=0, bos_token_id=1,
                                eos_token_id=3)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = CLIPTextModel(config)
        return cls(tokenizer, model, max_length)

    @classmethod
    def from_pretrained(cls, path) -> "TextEncoder":
        """Load a local tokenizer + CLIPTextModel directory (as written by save_pretrained)."""
        from transformers import AutoTokenizer, CLIPTextModel

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"text encoder directory {path} does not exist (use 'tiny' to build one locally)")
        return cls(AutoTokenizer.from_pretrained(path), CLIPTextModel.from_pretrained(path))

    def save_pretrained(self, path) -> None:
        self.tokenizer.save_pretrained(path)
        self.model.save_pretrained(path)

    @torch.no_grad()
    def forward(self, texts: list[str]):
        ids = self.tokenizer(list(texts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").input_ids.to(self.model.device)
        out = self.model(input_ids=ids)
        return out.last_hidden_state, out.pooler_output
