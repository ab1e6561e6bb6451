"""The IXC-2.5-Reward tokenizer: SentencePiece plus the special-token splitting of the HF wrapper upstream uses.

The release's ``tokenizer.model`` is a SentencePiece BPE model (92544 pieces, byte fallback, identity normalizer,
``add_dummy_prefix`` false, so text chunks encode without a leading "▁"). Upstream wraps it in a slow
``transformers`` tokenizer whose special tokens are ``<unk>`` (0), ``<s>`` (1) and ``</s>`` (2, also the pad).
That wrapper cuts those three strings out of the text by exact match before SentencePiece sees it and keeps the
surrounding whitespace (transformers >= 4.34 registers them as AddedToken with lstrip/rstrip false; 4.33 and older
stripped whitespace around them, which would drop the "\\n" in front of the template's final ``</s>``). Every other
chunk goes through ``SentencePieceProcessor.encode`` unchanged; an empty chunk yields no ids.

``[UNUSED_TOKEN_n]`` (n = 0..146) are user-defined pieces of the model, ids 92397 + n, which SentencePiece itself
matches atomically: no splitting is needed for them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

UNUSED_TOKEN_BASE = 92397  # id of [UNUSED_TOKEN_0] in the release vocabulary
N_UNUSED_TOKENS = 147  # [UNUSED_TOKEN_0] .. [UNUSED_TOKEN_146]

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
IM_START = "[UNUSED_TOKEN_146]"
IM_END = "[UNUSED_TOKEN_145]"
REWARD_TOKEN = "[UNUSED_TOKEN_130]"
IMAGE_PLACEHOLDER = "<ImageHere>"


def unused_token(n: int) -> str:
    """The text of ``[UNUSED_TOKEN_n]``."""
    _check_unused_index(n)
    return f"[UNUSED_TOKEN_{n}]"


def unused_token_id(n: int) -> int:
    """Id of ``[UNUSED_TOKEN_n]`` in the release vocabulary: 92397 + n (146 -> 92543, 145 -> 92542, 130 -> 92527)."""
    _check_unused_index(n)
    return UNUSED_TOKEN_BASE + n


def _check_unused_index(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < N_UNUSED_TOKENS:
        raise ValueError(f"unused token index must be an int in [0, {N_UNUSED_TOKENS}), got {n!r}")


class Tokenizer:
    """SentencePiece tokenizer with ``<s>``, ``</s>``, ``<unk>`` in text mapped to their ids (as the HF wrapper does).

    ``model`` is a path to a ``.model`` file or the serialized model bytes.
    """

    __slots__ = ("_bos_id", "_eos_id", "_sp", "_special_ids", "_split_re", "_unk_id", "_vocab_size")

    def __init__(self, model: str | os.PathLike | bytes) -> None:
        # The release's model makes SentencePiece log "Piece at index 354 is a null character" (and absl a banner)
        # on every load, harmless and alarming; only errors are logged (a process-wide setting of the library).
        if hasattr(spm, "set_min_log_level"):
            spm.set_min_log_level(2)
        if isinstance(model, (bytes, bytearray, memoryview)):
            try:
                self._sp = spm.SentencePieceProcessor(model_proto=bytes(model))
            except (RuntimeError, OSError) as exc:
                raise ValueError(f"model: bytes are not a serialized SentencePiece model ({exc})") from exc
        elif isinstance(model, (str, os.PathLike)):
            path = Path(model)
            if not path.is_file():
                raise FileNotFoundError(f"model: tokenizer file {str(path)!r} does not exist")
            try:
                self._sp = spm.SentencePieceProcessor(model_file=str(path))
            except (RuntimeError, OSError) as exc:
                raise ValueError(f"model: {str(path)!r} is not a SentencePiece model ({exc})") from exc
        else:
            raise TypeError(f"model must be a path or the serialized model bytes, got {type(model).__name__}")
        self._vocab_size = self._sp.get_piece_size()
        self._unk_id = self._sp.unk_id()
        self._bos_id = self._sp.bos_id()
        self._eos_id = self._sp.eos_id()
        self._special_ids: dict[str, int] = {}
        for name, idx in ((UNK_TOKEN, self._unk_id), (BOS_TOKEN, self._bos_id), (EOS_TOKEN, self._eos_id)):
            if idx < 0 or self._sp.id_to_piece(idx) != name:
                raise ValueError(f"model: expected the piece {name!r} in the vocabulary (unk/bos/eos), it is missing")
            self._special_ids[name] = idx
        # Longest first so that no special token can shadow a longer one starting at the same position.
        alternatives = sorted(self._special_ids, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(s) for s in alternatives) + ")")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        return cls(Path(path))

    def __reduce__(self):
        return (Tokenizer, (self.model_proto,))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self._vocab_size})"

    # --- ids -------------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def unk_id(self) -> int:
        return self._unk_id

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._eos_id  # the HF wrapper pads with </s>

    @property
    def im_start_id(self) -> int:
        return self.piece_to_id(IM_START)

    @property
    def im_end_id(self) -> int:
        return self.piece_to_id(IM_END)

    @property
    def reward_id(self) -> int:
        return self.piece_to_id(REWARD_TOKEN)

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model (to ship to worker processes or hash)."""
        return self._sp.serialized_model_proto()

    def unused_token_id(self, n: int) -> int:
        """Id of ``[UNUSED_TOKEN_n]`` in this model (92397 + n for the release vocabulary)."""
        return self.piece_to_id(unused_token(n))

    def piece_to_id(self, piece: str) -> int:
        """Id of a vocabulary piece; KeyError if the model has no such piece."""
        idx = self._sp.piece_to_id(piece)
        if idx == self._unk_id and piece != UNK_TOKEN:
            raise KeyError(f"piece {piece!r} is not in the tokenizer vocabulary")
        return idx

    def id_to_piece(self, idx: int) -> str:
        self._check_id(idx)
        return self._sp.id_to_piece(idx)

    # --- text <-> ids ----------------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_bos`` puts ``<s>`` (id 1) in front, as the HF wrapper's add_special_tokens."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = [self._bos_id] if add_bos else []
        special = self._special_ids
        # re.split with one capturing group alternates plain chunks (even positions) and special tokens (odd).
        for i, chunk in enumerate(self._split_re.split(text)):
            if i % 2:
                ids.append(special[chunk])
            elif chunk:
                ids.extend(self._sp.encode(chunk))
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``: runs of ordinary ids are decoded by SentencePiece, ``<s>``/``</s>``/``<unk>`` ids become
        their strings (or nothing with ``skip_special``). The exact inverse of ``encode`` for any text.

        Unlike the HF wrapper's ``decode``, no space is inserted around special tokens."""
        out: list[str] = []
        run: list[int] = []
        special_by_id = {v: k for k, v in self._special_ids.items()}
        for idx in ids:
            idx = int(idx)
            self._check_id(idx)
            name = special_by_id.get(idx)
            if name is None:
                run.append(idx)
                continue
            if run:
                out.append(self._sp.decode(run))
                run = []
            if not skip_special:
                out.append(name)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def _check_id(self, idx: int) -> None:
        if not 0 <= idx < self._vocab_size:
            raise ValueError(f"token id {idx} is outside the vocabulary [0, {self._vocab_size})")
