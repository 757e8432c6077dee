"""Text → token ids, exactly as the model directory's tokenizer files say.

Special tokens come from the tokenizer's own post-processor (KaLM v2.5 appends
``<|endoftext|>``, v2 may not): nothing is added or dropped by hand. Prompts
(query instructions) are prepended to the text before tokenisation, as
sentence-transformers does.

Runs on the ``tokenizers`` library alone (the model directory's ``tokenizer.json``), so
the ingress, which tokenises every request, never imports transformers or torch. Only a
directory without ``tokenizer.json`` goes through transformers, to convert its slow
tokenizer once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from ..errors import InputTooLongError, InvalidRequestError, TokenIdOutOfRangeError
from .checkpoint import ModelFiles, instruction_prompt


@dataclass(frozen=True)
class TokenizedInput:
    """Token ids of one input and whether they were cut to the limit."""

    ids: list[int]
    truncated: bool = False


class TextTokenizer:
    """Formats prompts, tokenises, enforces the per-input token limit."""

    def __init__(self, files: ModelFiles, max_input_tokens: int | None = None):
        self.tokenizer = load_tokenizer(files.path)
        self.prompts = dict(files.prompts)
        self.default_prompt_name = files.default_prompt_name
        model_limit = files.max_input_tokens
        self.max_input_tokens = min(max_input_tokens or model_limit, model_limit)
        # Ids the model can embed: the tokenizer's ids (regular + special), nothing beyond.
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.pad_token_id = pad_token_id(files.path, self.tokenizer)

    @classmethod
    def from_dir(cls, path: str | Path, max_input_tokens: int | None = None) -> TextTokenizer:
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

    def request_prompt(
        self,
        instruction: str | None = None,
        input_type: str | None = None,
        default_query_instruction: str | None = None,
    ) -> str:
        """The prefix for the API's ``instruction`` / ``input_type`` fields (the service and the corpus job).

        ``input_type: query`` uses ``default_query_instruction`` when one is configured, else the
        model's ``query`` prompt; ``document`` the model's ``document`` prompt (usually none).
        """
        if instruction is not None:
            return self.prompt_for(instruction=instruction)
        if input_type == "query":
            if default_query_instruction is not None:
                return self.prompt_for(instruction=default_query_instruction)
            return self.prompt_for(prompt_name="query") if "query" in self.prompts else ""
        if input_type == "document":
            return self.prompts.get("document", "")
        return self.prompt_for()

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
        out = [TokenizedInput(e.ids) for e in self.tokenizer.encode_batch(full, add_special_tokens=True)]
        too_long = [i for i, x in enumerate(out) if len(x.ids) > self.max_input_tokens]
        if too_long and not truncate:
            first = too_long[0]
            raise InputTooLongError(first, len(out[first].ids), self.max_input_tokens)
        if too_long:
            # Cut as the tokenizer's own truncation does, so special tokens its post-processor adds
            # are kept: content tokens to the limit minus those, then the post-processor (a copy of
            # the tokenizer with truncation enabled would cost seconds per request).
            keep = self.max_input_tokens - self.tokenizer.num_special_tokens_to_add(False)
            for i in too_long:
                encoding = self.tokenizer.encode(full[i], add_special_tokens=False)
                encoding.truncate(keep)
                out[i] = TokenizedInput(self.tokenizer.post_process(encoding).ids, truncated=True)
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


def load_tokenizer(path: Path) -> Tokenizer:
    """The directory's fast tokenizer: ``tokenizer.json``, else converted from its slow files."""
    if (path / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False).backend_tokenizer
    # Some files carry padding and truncation settings (BERT-likes: 128 tokens); the limits here decide.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def pad_token_id(path: Path, tokenizer: Tokenizer) -> int:
    """The ``pad_token`` of ``tokenizer_config.json`` (a string or ``{"content": ...}``), else 0."""
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    pad = config.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    found = tokenizer.token_to_id(pad) if pad else None
    return found if found is not None else 0
