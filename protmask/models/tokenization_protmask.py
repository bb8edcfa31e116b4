"""`ProtMaskTokenizer`: one token per residue over the amino-acid alphabet, with pad / mask / unk specials."""

from __future__ import annotations

import os

from transformers.tokenization_python import PreTrainedTokenizer

from ..residues import AMINO_ACIDS, UNKNOWN_RESIDUE

SPECIAL_TOKENS = ("<pad>", "<mask>", "<unk>")
#: The vocabulary in id order: specials first, so that padding is id 0, then the 20 residues and X.
DEFAULT_VOCAB = (*SPECIAL_TOKENS, *AMINO_ACIDS, UNKNOWN_RESIDUE)
VOCAB_FILES_NAMES = {"vocab_file": "vocab.txt"}


class ProtMaskTokenizer(PreTrainedTokenizer):
    """Amino-acid tokenizer: ``"MKV<mask>L"`` → one id per residue, no begin / end tokens.

    Lower-case letters are read as upper case; any letter outside the alphabet becomes ``X`` (an amino acid
    of unknown type), which keeps chains the length of their structure. ``<mask>`` may be written inline.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file=None, pad_token="<pad>", mask_token="<mask>", unk_token="<unk>", **kwargs):
        if vocab_file is not None and os.path.isfile(vocab_file):
            with open(vocab_file, encoding="utf-8") as handle:
                tokens = [line.strip() for line in handle if line.strip()]
        else:
            tokens = list(DEFAULT_VOCAB)
        self.all_tokens = tokens
        self._token_to_id = {token: index for index, token in enumerate(tokens)}
        self._id_to_token = dict(enumerate(tokens))
        super().__init__(pad_token=pad_token, mask_token=mask_token, unk_token=unk_token, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.all_tokens)

    @property
    def amino_acid_ids(self) -> list[int]:
        """Ids of the 20 standard amino acids, in alphabet order (what design samples from)."""
        return [self._token_to_id[a] for a in AMINO_ACIDS]

    @property
    def unknown_residue_id(self) -> int:
        return self._token_to_id[UNKNOWN_RESIDUE]

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._token_to_id)
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [c if c in self._token_to_id else UNKNOWN_RESIDUE for c in text.upper() if not c.isspace()]

    def _convert_token_to_id(self, token: str) -> int:
        if token in self._token_to_id:
            return self._token_to_id[token]
        if len(token) == 1 and token.upper() in self._token_to_id:
            return self._token_to_id[token.upper()]
        if len(token) == 1 and token.isalpha():
            return self._token_to_id[UNKNOWN_RESIDUE]
        return self._token_to_id[self.unk_token]

    def _convert_id_to_token(self, index: int) -> str:
        return self._id_to_token.get(index, self.unk_token)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        # One token per residue: positions must line up with the structure's residues.
        return token_ids_0 if token_ids_1 is None else token_ids_0 + token_ids_1

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [1 if t in special else 0 for t in token_ids_0]
        return [0] * (len(token_ids_0) + (len(token_ids_1) if token_ids_1 else 0))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None):
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "vocab.txt")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(self.all_tokens) + "\n")
        return (path,)


__all__ = ["ProtMaskTokenizer"]
