"""Token vocabularies: bytes (default for text), a local Hugging Face `tokenizer.json`, or a task's
own list of symbols. Each describes itself for the manifest. Nothing is ever downloaded."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from sleepscale.data.sample import DataError


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 ends a document, 257 pads."""

    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def describe(self) -> dict[str, Any]:
        return {"kind": "bytes", "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id}


class HuggingFaceTokenizer:
    """A local `tokenizer.json` (the `tokenizers` library); its end-of-text token ends documents."""

    EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")
    PAD_CANDIDATES = ("<pad>", "[PAD]", "<|padding|>")

    def __init__(self, path: str | Path, eos_token: str | None = None):
        from tokenizers import Tokenizer  # a Rust extension, ~10-20 ms: only for a tokenizer.json

        self.path = Path(path)
        try:
            self._tokenizer = Tokenizer.from_file(str(self.path))
        except Exception as error:  # the library raises bare Exceptions for missing or malformed files
            raise DataError(f"tokenizer {self.path}: cannot load ({str(error).splitlines()[0]})") from None
        self.vocab_size = self._tokenizer.get_vocab_size()
        self.eos_id = self._find([eos_token] if eos_token else self.EOS_CANDIDATES, "end-of-text", "--eos-token")
        pad = next((self._tokenizer.token_to_id(t) for t in self.PAD_CANDIDATES if self._tokenizer.token_to_id(t) is not None), None)
        self.pad_id = self.eos_id if pad is None else pad

    def _find(self, candidates, what: str, option: str) -> int:
        for token in candidates:
            token_id = self._tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        raise DataError(f"tokenizer {self.path}: no {what} token among {', '.join(candidates)}; name one with {option}")

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tokenizer.decode(list(ids))

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "huggingface",
            "path": str(self.path),
            "sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(),
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }


class SymbolVocabulary:
    """A task's own tokens: id i is symbols[i]; id 0 pads."""

    def __init__(self, symbols: list[str]):
        if len(set(symbols)) != len(symbols):
            raise ValueError("symbols must be distinct")
        self.symbols = list(symbols)
        self.ids = {symbol: i for i, symbol in enumerate(symbols)}
        self.vocab_size = len(symbols)
        self.pad_id = 0

    def __getitem__(self, symbol: str) -> int:
        return self.ids[symbol]

    def encode(self, text: str) -> list[int]:
        """Whitespace-separated symbols, e.g. "0 1 1 ?1"."""
        unknown = [symbol for symbol in text.split() if symbol not in self.ids]
        if unknown:
            raise DataError(f"symbol {unknown[0]!r} is not in the vocabulary ({' '.join(self.symbols)}); "
                            "write the prompt as those symbols separated by spaces")
        return [self.ids[symbol] for symbol in text.split()]

    def decode(self, ids) -> str:
        return " ".join(self.symbols[i] for i in ids)

    def describe(self) -> dict[str, Any]:
        return {"kind": "symbols", "vocab_size": self.vocab_size, "pad_id": self.pad_id, "symbols": self.symbols}


def load_tokenizer(path: str | Path | None, eos_token: str | None = None):
    return ByteTokenizer() if path is None else HuggingFaceTokenizer(path, eos_token)


def tokenizer_from_description(description: dict[str, Any]):
    """The tokenizer a dataset's manifest describes (its `tokenizer` entry, from `describe()`)."""
    kind = description.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "symbols":
        return SymbolVocabulary(description["symbols"])
    if kind == "huggingface":
        tokenizer = HuggingFaceTokenizer(description["path"])
        tokenizer.eos_id = description.get("eos_id", tokenizer.eos_id)
        return tokenizer
    raise DataError(f"unknown tokenizer kind {kind!r} in the dataset's manifest")
