"""Tokenizers for data preparation: GPT-2 through tiktoken, and raw bytes for the offline demo."""

from __future__ import annotations

from pathlib import Path

GPT2_VOCAB = 50257
GPT2_EOT = 50256
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded: the message says why and what to do."""


class BytesTokenizer:
    """The 256 byte values plus an end-of-text token 256: needs nothing from the network."""

    name = "bytes"
    vocab_size = 257
    eot = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class GPT2Tokenizer:
    """tiktoken's GPT-2 encoding; offline from a pre-filled TIKTOKEN_CACHE_DIR or a ranks file."""

    name = "gpt2"
    vocab_size = GPT2_VOCAB
    eot = GPT2_EOT

    def __init__(self, tokenizer_file: str | None = None):
        import tiktoken

        if tokenizer_file:
            from tiktoken.load import load_tiktoken_bpe

            path = Path(tokenizer_file)
            if not path.exists():
                raise TokenizerError(f"{path}: tokenizer file not found")
            ranks = load_tiktoken_bpe(str(path))
            if len(ranks) != GPT2_EOT:
                raise TokenizerError(f"{path}: holds {len(ranks)} ranks, GPT-2 has {GPT2_EOT}")
            self.encoding = tiktoken.Encoding(
                name="gpt2",
                pat_str=GPT2_PATTERN,
                mergeable_ranks=ranks,
                special_tokens={"<|endoftext|>": GPT2_EOT},
                explicit_n_vocab=GPT2_VOCAB,
            )
        else:
            try:
                self.encoding = tiktoken.get_encoding("gpt2")
            except Exception as err:  # no network and no cache
                raise TokenizerError(
                    f"cannot load tiktoken's gpt2 encoding ({type(err).__name__}: {err}); offline, pre-fill "
                    "TIKTOKEN_CACHE_DIR or pass --tokenizer-file with a gpt2.tiktoken ranks file"
                ) from None

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])


def load_tokenizer(name: str, tokenizer_file: str | None = None):
    if name == "bytes":
        return BytesTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer(tokenizer_file)
    raise TokenizerError(f"unknown tokenizer {name!r} (known: gpt2, bytes)")


def padded_vocab(vocab_size: int, multiple: int = 64) -> int:
    """The model's vocabulary: the tokenizer's padded to a multiple of 64 (50257 -> 50304, 257 -> 320)."""
    return -(-vocab_size // multiple) * multiple
