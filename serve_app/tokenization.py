"""Text → token ids, exactly as the model directory's tokenizer files say.

Special tokens come from the tokenizer's own post-processor (KaLM v2.5 appends
``<|endoftext|>``, v2 may not): nothing is added or dropped by hand. Prompts
(query instructions) are prepended to the text before tokenisation, as
sentence-transformers does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .checkpoint import ModelFiles, instruction_prompt
from .errors import InputTooLongError, InvalidRequestError, TokenIdOutOfRangeError


@dataclass(frozen=True)
class TokenizedInput:
    """Token ids of one input and whether they were cut to the limit."""

    ids: list[int]
    truncated: bool = False


class TextTokenizer:
    """Formats prompts, tokenises, enforces the per-input token limit."""

    def __init__(self, files: ModelFiles, max_input_tokens: int | None = None):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(files.path), trust_remote_code=False)
        self.prompts = dict(files.prompts)
        self.default_prompt_name = files.default_prompt_name
        model_limit = files.max_input_tokens
        self.max_input_tokens = min(max_input_tokens or model_limit, model_limit)
        # Ids the model can embed: the tokenizer's ids (regular + special), nothing beyond.
        self.vocab_size = len(self.tokenizer)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_dir(cls, path: str | Path, max_input_tokens: int | None = None) -> "TextTokenizer":
        from .checkpoint import read_model_files

        return cls(read_model_files(path), max_input_tokens)

    # --- prompts -------------------------------------------------------------------

    def prompt_for(self, instruction: str | None = None, prompt_name: str | None = None) -> str:
        """The prefix for a text: an explicit instruction wins over a named prompt."""
        if instruction is not None:
            return instruction_prompt(instruction)
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            raise InvalidRequestError(
                f"unknown prompt name {name!r}; this model has {sorted(self.prompts) or 'none'}",
                param="input_type",
            )
        return self.prompts[name]

    # --- texts ---------------------------------------------------------------------

    def encode_texts(
        self,
        texts: Sequence[str],
        prompt: str = "",
        truncate: bool = False,
    ) -> list[TokenizedInput]:
        """Tokenise ``prompt + text`` for each text; over-long inputs fail or are cut."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidRequestError(f"input[{i}] must be a string", param="input")
            if not text:
                raise InvalidRequestError(f"input[{i}] is an empty string", param="input")
        full = [prompt + t for t in texts] if prompt else list(texts)
        ids = self.tokenizer(full, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        out = [TokenizedInput(list(x)) for x in ids]
        too_long = [i for i, x in enumerate(out) if len(x.ids) > self.max_input_tokens]
        if too_long and not truncate:
            first = too_long[0]
            raise InputTooLongError(first, len(out[first].ids), self.max_input_tokens)
        if too_long:
            # Let the tokenizer cut, so special tokens its post-processor adds are kept.
            cut = self.tokenizer(
                [full[i] for i in too_long],
                add_special_tokens=True,
                truncation=True,
                max_length=self.max_input_tokens,
            )["input_ids"]
            for i, x in zip(too_long, cut):
                out[i] = TokenizedInput(list(x), truncated=True)
        return out

    # --- token ids -----------------------------------------------------------------

    def check_token_ids(self, inputs: Sequence[Sequence[int]], truncate: bool = False) -> list[TokenizedInput]:
        """Token-id inputs are used as given (no special tokens added), after range checks."""
        out = []
        for i, ids in enumerate(inputs):
            if len(ids) == 0:
                raise InvalidRequestError(f"input[{i}] is an empty token list", param="input")
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise TokenIdOutOfRangeError(
                    f"input[{i}] holds token id {bad}, outside this model's vocabulary "
                    f"[0, {self.vocab_size}); token-id inputs must come from this model's "
                    f"tokenizer (LangChain: set check_embedding_ctx_length=False)"
                )
            if len(ids) > self.max_input_tokens:
                if not truncate:
                    raise InputTooLongError(i, len(ids), self.max_input_tokens)
                out.append(TokenizedInput(list(ids[: self.max_input_tokens]), truncated=True))
            else:
                out.append(TokenizedInput(list(ids)))
        return out
