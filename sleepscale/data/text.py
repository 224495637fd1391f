"""Plain text corpora packed into fixed-length next-token samples.

Documents come from `.txt` files (one document per file) and `.jsonl` files (one document per line,
its text under `field`), in the order given. Each document's tokens are followed by the
tokenizer's end-of-text token; the concatenated stream is cut into samples of `length + 1` tokens
that overlap by one, so sample i reads stream[i*length : (i+1)*length] and predicts the next token at
every position. A final piece shorter than a sample is dropped and its size reported.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sleepscale.data.sample import DataError, Sample

VERSION = "1"


def read_documents(paths: list[Path], field: str) -> Iterator[str]:
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as lines:
                for number, line in enumerate(lines, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
                    if not isinstance(record, dict) or not isinstance(record.get(field), str):
                        raise DataError(f"{path}:{number}: no text field {field!r} (choose one with --field)")
                    yield record[field]
        elif path.suffix == ".txt":
            yield path.read_text(encoding="utf-8")
        else:
            raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .txt or .jsonl)")


class TextCorpus:
    name = "text"

    def __init__(self, paths, length: int, tokenizer, field: str = "text"):
        if length < 1:
            raise ValueError("length must be >= 1")
        self.paths, self.sequence_length, self.field = [Path(p) for p in paths], length, field
        self.tokenizer = self.vocabulary = tokenizer
        self.dropped_tail_tokens = 0

    def params(self) -> dict:
        return {"files": [str(p) for p in self.paths], "length": self.sequence_length, "field": self.field}

    def samples(self) -> Iterator[Sample]:
        span = self.sequence_length + 1
        buffer: list[int] = []
        for document in read_documents(self.paths, self.field):
            buffer += self.tokenizer.encode(document) + [self.tokenizer.eos_id]
            while len(buffer) >= span:
                chunk = np.asarray(buffer[:span])
                buffer = buffer[self.sequence_length :]
                yield Sample(chunk[:-1], chunk[1:], {"task": self.name, "difficulty": {}, "answer": None})
        self.dropped_tail_tokens = len(buffer) - 1 if buffer else 0
