"""Tokenizers: a tiny character-level one (the toy language, the tests) and HF tokenizers, one interface.

The trainers use only what HF tokenizers also have: ``encode(text, add_special_tokens=...)``,
``decode(ids, skip_special_tokens=True)``, ``pad_token_id``, ``eos_token_id``, ``bos_token_id`` and
``save_pretrained(dir)``. ``load_tokenizer(path)`` picks the right one for a model directory.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAR_TOKENIZER_FILE = "char_tokenizer.json"


class CharTokenizer:
    """One token per character plus <pad>, <bos>, <eos>. Unknown characters are an error, not <unk>:
    the toy language is closed, and a silent <unk> would hide a bug."""

    SPECIALS = ("<pad>", "<bos>", "<eos>")

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError("duplicate characters in the alphabet")
        self.chars = chars
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self._ids = {c: i + len(self.SPECIALS) for i, c in enumerate(chars)}

    def __len__(self) -> int:
        return len(self.SPECIALS) + len(self.chars)

    @property
    def vocab_size(self) -> int:
        return len(self)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            ids = [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the alphabet {self.chars!r}") from None
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = []
        for i in (ids.tolist() if hasattr(ids, "tolist") else ids):
            i = int(i)
            if i < len(self.SPECIALS):
                if not skip_special_tokens:
                    out.append(self.SPECIALS[i])
            else:
                out.append(self.chars[i - len(self.SPECIALS)])
        return "".join(out)

    def save_pretrained(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / CHAR_TOKENIZER_FILE).write_text(json.dumps({"type": "char", "chars": self.chars}))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "CharTokenizer":
        meta = json.loads((Path(directory) / CHAR_TOKENIZER_FILE).read_text())
        return cls(meta["chars"])


def load_tokenizer(name_or_path: str):
    """The char tokenizer if the directory holds one, else ``AutoTokenizer`` (pad defaults to eos)."""
    if (Path(name_or_path) / CHAR_TOKENIZER_FILE).is_file():
        return CharTokenizer.from_pretrained(name_or_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
