"""Caption tokenizers that need no download: a byte-level BPE trained on the captions, or plain bytes.

Both give fixed-length id rows: `encode(texts)` → long (N, context_length), each caption's ids, then
the end-of-text token, then padding. Truncation keeps the end token (the text is cut before it), so
every row holds exactly one end token, and the last position of every row is the end token or a pad:
a text tower that pools its LAST position (as SigLIP's) reads the same kind of token for every caption.

Special tokens, ids 0 and 1 in both kinds:
    0  `<|pad|>`        padding after the end token
    1  `<|endoftext|>`  end of every caption
Caption text that spells a special token is encoded as plain text, so decode(encode(c)) == c exactly
for any caption that fits (BPE: byte-level pre-tokenizer and decoder, no normalizer; bytes: UTF-8).

BPE (`BPETokenizer`): trained by `train_bpe` from the training captions with the HF `tokenizers`
library and saved as `tokenizer.json` (that library's JSON format: data, never code) next to the
shards' index.json. Bytes (`ByteTokenizer`): ids 2..257 are the bytes 0..255; needs no file.
`data.tokenizer`: auto (the shards' tokenizer.json if they have one, else bytes) | bytes | PATH.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from bigvit.errors import ConfigError

PAD, END = "<|pad|>", "<|endoftext|>"
PAD_ID, END_ID = 0, 1
TOKENIZER_FILE = "tokenizer.json"
BYTES_KIND = {"bigvit_tokenizer": "bytes"}  # what ByteTokenizer.save writes, so runs can copy any kind
DEFAULT_VOCAB_SIZE = 8192


class CaptionTokenizer:
    """Shared by both kinds: fixed-length rows from each kind's `ids` (one text) / `text` (ids → str)."""

    kind = ""
    pad_id, end_id = PAD_ID, END_ID

    def __init__(self, context_length: int):
        if not isinstance(context_length, int) or context_length < 2:
            raise ConfigError(
                f"data.context_length={context_length!r} must be an integer >= 2 (a token and the end token)"
            )
        self.context_length = context_length

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def text(self, ids: list[int]) -> str:
        raise NotImplementedError

    def row(self, text: str) -> list[int]:
        """One caption's `context_length` ids: its tokens (cut to fit), the end token, then pads."""
        ids = self.ids(text)[: self.context_length - 1] + [self.end_id]
        return ids + [self.pad_id] * (self.context_length - len(ids))

    def encode(self, texts: str | Sequence[str]) -> torch.Tensor:
        """long (N, context_length) ids of `texts` (one str → N = 1)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return torch.tensor([self.row(text) for text in texts], dtype=torch.long).reshape(
            -1, self.context_length
        )

    def decode(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """The text of each row of ids, up to its first end token (pads and special tokens dropped)."""
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else [list(row) for row in ids]
        if rows and not isinstance(rows[0], list):
            rows = [rows]
        texts = []
        for row in rows:
            row = row[: row.index(self.end_id)] if self.end_id in row else row
            texts.append(self.text([i for i in row if i not in (self.pad_id, self.end_id)]))
        return texts

    def to_json(self) -> str:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer as JSON to `path` (a file, or a folder → folder/tokenizer.json); return the file."""
        path = Path(path)
        path = path / TOKENIZER_FILE if path.is_dir() else path
        path.write_text(self.to_json())
        return path


class ByteTokenizer(CaptionTokenizer):
    """UTF-8 bytes: id = byte + 2. The fallback that needs no file."""

    kind = "bytes"

    @property
    def vocab_size(self) -> int:
        return 256 + 2

    def ids(self, text: str) -> list[int]:
        return [byte + 2 for byte in text.encode("utf-8")]

    def text(self, ids: list[int]) -> str:
        # A row cut inside a multi-byte character decodes with a replacement character.
        return bytes(i - 2 for i in ids if 2 <= i < 258).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps(BYTES_KIND)


class BPETokenizer(CaptionTokenizer):
    """A byte-level BPE held as its tokenizer.json text; the `tokenizers` object is built on first use,
    so the reader that holds one pickles small and fast into every dataloader worker."""

    kind = "bpe"

    def __init__(self, json_text: str, context_length: int):
        super().__init__(context_length)
        self.json_text, self._tokenizer = json_text, None
        if self.tokenizer.token_to_id(PAD) != PAD_ID or self.tokenizer.token_to_id(END) != END_ID:
            raise ConfigError(
                f"a tokenizer.json must have {PAD} at id {PAD_ID} and {END} at id {END_ID} (as "
                "bigvit-shards trains them); this one has "
                f"{self.tokenizer.token_to_id(PAD)} and {self.tokenizer.token_to_id(END)}"
            )

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_str(self.json_text)
            self._tokenizer.encode_special_tokens = (
                True  # a caption saying "<|pad|>" is text (not saved in the JSON)
            )
        return self._tokenizer

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def to_json(self) -> str:
        return self.json_text


def train_bpe(captions: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
    """tokenizer.json text of a byte-level BPE trained on `captions` with at most `vocab_size` tokens
    (256 byte tokens + the 2 specials + merges; fewer when the captions run out of pairs to merge)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ValueError(f"vocab_size={vocab_size} must be >= 258 (256 byte tokens and 2 special tokens)")
    tokenizer = Tokenizer(models.BPE())
    # No prefix space and no normalizer: decoding gives back the caption's exact bytes.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, END],  # in this order: ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen in training or not
        show_progress=False,
    )
    tokenizer.train_from_iterator(captions, trainer=trainer)
    return tokenizer.to_str()


def from_json(text: str, context_length: int, where: str = "tokenizer") -> CaptionTokenizer:
    """A tokenizer from JSON text (ByteTokenizer.save's or a tokenizer.json); a ConfigError naming `where` if neither."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where} is not JSON ({error}); expected a tokenizer.json") from None
    if data == BYTES_KIND:
        return ByteTokenizer(context_length)
    if not isinstance(data, dict) or "model" not in data:
        raise ConfigError(f"{where} is not a tokenizer.json (no 'model' entry)")
    try:
        return BPETokenizer(text, context_length)
    except Exception as error:  # the Rust library raises its own exception type for a bad file
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{where} is not a tokenizer the tokenizers library reads: {error}") from None


def load_tokenizer(path: str | Path, context_length: int) -> CaptionTokenizer:
    """The tokenizer saved at `path` (a file, or a folder holding tokenizer.json)."""
    path = Path(path)
    path = path / TOKENIZER_FILE if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(
            f"data.tokenizer={str(path)!r} does not exist; give auto, bytes or a tokenizer.json"
        )
    return from_json(path.read_text(), context_length, f"data.tokenizer={str(path)!r}")


def shards_tokenizer(folder: str | Path) -> Path | None:
    """The tokenizer.json the index.json in `folder` records, if it records one."""
    index = Path(folder) / "index.json"
    if not index.is_file():
        return None
    entry = json.loads(index.read_text()).get("tokenizer")
    return Path(folder) / entry["file"] if entry else None


def build_tokenizer(spec: str, context_length: int, folders: Sequence[str | Path] = ()) -> CaptionTokenizer:
    """`data.tokenizer`: "bytes", a path, or "auto" = the tokenizer of the shards in `folders` (all must
    agree), else bytes."""
    spec = str(spec or "auto")
    if spec == "bytes":
        return ByteTokenizer(context_length)
    if spec != "auto":
        return load_tokenizer(spec, context_length)
    files = {str(path): path for folder in folders if (path := shards_tokenizer(folder)) is not None}
    texts = {path.read_text() for path in files.values()}
    if len(texts) > 1:
        raise ConfigError(
            f"data.tokenizer=auto: the training shards carry {len(texts)} different tokenizers "
            f"({sorted(files)[:3]}); set data.tokenizer=PATH (or bytes) to choose one"
        )
    if not texts:
        return ByteTokenizer(context_length)
    path = next(iter(files.values()))
    return from_json(texts.pop(), context_length, f"the shards' tokenizer {str(path)!r}")
