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

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast, overload

from tokenizers import Encoding, Tokenizer

from ..errors import InputTooLongError, InvalidRequestError, TokenIdOutOfRangeError
from .checkpoint import ModelFiles, instruction_prompt

#: Texts up to this many characters per token of the limit are tokenised whole; a longer one is
#: tokenised a prefix at a time (4x longer each time) until its tokens pass the limit or it ends.
#: Ordinary text has 1-8 characters per token, so most inputs are tokenised once.
FIRST_PREFIX_CHARS_PER_TOKEN = 4

#: Under a request token limit, short texts are tokenised together in groups of about this many
#: characters, so a request over its limit is refused after about that much extra work.
GROUP_CHARS = 256 * 1024

#: A prefix is cut before whitespace found in its last this-many characters, so the pieces of text
#: before the cut are tokenised exactly as in the whole text ...
CUT_SEARCH_CHARS = 256
#: ... and only its last pieces may differ: a prefix proves an input too long with this margin.
CUT_MARGIN_TOKENS = 2


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
        # Tokens the post-processor adds to one text (as the tokenizer files say: e.g. an appended EOS).
        self.n_special_tokens = self.tokenizer.num_special_tokens_to_add(False)

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

    @functools.cached_property
    def max_chars_per_token(self) -> int:
        """The most characters one token can stand for: its longest vocabulary entry.

        A byte-level BPE token of n bytes covers at most n characters (KaLM v2: 128, a run of spaces);
        added tokens are matched as their text. So a text longer than ``limit x this`` characters has
        more than ``limit`` tokens and is refused uncounted. (NFC normalisation can merge a letter and
        its combining marks into one character, which only makes such texts longer in tokens.)
        """
        return max(len(token) for token in self.tokenizer.get_vocab(with_added_tokens=True))

    def encode_texts(
        self,
        texts: Sequence[str],
        prompt: str = "",
        truncate: bool = False,
    ) -> list[TokenizedInput]:
        """Tokenise ``prompt + text`` for each text, whole; over-long inputs fail or are cut."""
        return _raise_too_long(self._encode(texts, prompt, truncate, range(len(texts))))

    @overload
    def encode_within_limits(
        self,
        texts: Sequence[str],
        prompt: str = ...,
        truncate: bool = ...,
        max_request_tokens: int | None = ...,
        *,
        keep_too_long: Literal[False] = ...,
    ) -> list[TokenizedInput]: ...

    @overload
    def encode_within_limits(
        self,
        texts: Sequence[str],
        prompt: str = ...,
        truncate: bool = ...,
        max_request_tokens: int | None = ...,
        *,
        keep_too_long: Literal[True],
    ) -> list[TokenizedInput | InputTooLongError]: ...

    def encode_within_limits(
        self,
        texts: Sequence[str],
        prompt: str = "",
        truncate: bool = False,
        max_request_tokens: int | None = None,
        *,
        keep_too_long: bool = False,
    ) -> list[TokenizedInput] | list[TokenizedInput | InputTooLongError]:
        """Tokenise ``prompt + text`` for each text, no more of it than the limits need.

        Characters first: a text that cannot fit ``max_input_tokens`` is over-long (or, with
        ``truncate``, cut to what can fit) before tokenising; then tokens: long texts a prefix at a
        time, and, given ``max_request_tokens`` (all texts together), the texts stop as soon as their
        running token count passes it. An over-long input raises its ``InputTooLongError`` (the
        service refuses the request), or with ``keep_too_long`` stands in the list in its place (the
        corpus job makes it a bad row); either way each text is tokenised once.
        """
        limit = self.max_input_tokens
        max_chars = limit * self.max_chars_per_token
        out: list[TokenizedInput | InputTooLongError | None] = [None] * len(texts)
        for i, text in enumerate(texts):
            if not text:
                raise InvalidRequestError(f"input[{i}] is an empty string", param="input")
            if len(text) > max_chars and not truncate:
                out[i] = _too_long(
                    InputTooLongError(
                        i,
                        f"{len(text)} characters (more than any {limit} tokens can hold: a token is at most "
                        f"{self.max_chars_per_token} characters)",
                        limit,
                    ),
                    keep_too_long,
                )
        texts = [text[:max_chars] for text in texts]
        if max_request_tokens is not None:
            n_chars = sum(len(text) for text in texts)
            if n_chars > max_request_tokens * self.max_chars_per_token:
                raise InvalidRequestError(
                    f"the request has {n_chars} characters, more than its token limit can hold (a token is at "
                    f"most {self.max_chars_per_token} characters); at most {max_request_tokens} tokens are "
                    f"allowed per request: split it",
                    param="input",
                )

        todo = [i for i, result in enumerate(out) if result is None]
        first_prefix = limit * FIRST_PREFIX_CHARS_PER_TOKEN
        group_chars = GROUP_CHARS if max_request_tokens is not None else math.inf  # groups only stop early
        n_tokens, start = 0, 0
        while start < len(todo):
            if len(texts[todo[start]]) > first_prefix:
                group = todo[start : start + 1]
                results = [self._encode_long(group[0], texts[group[0]], prompt, truncate, first_prefix)]
            else:
                end, chars = start, 0
                while end < len(todo) and len(texts[todo[end]]) <= first_prefix and chars < group_chars:
                    chars += len(texts[todo[end]])
                    end += 1
                group = todo[start:end]
                results = self._encode([texts[i] for i in group], prompt, truncate, group)
            for i, result in zip(group, results):
                out[i] = _too_long(result, keep_too_long) if isinstance(result, InputTooLongError) else result
            start += len(group)
            n_tokens += sum(len(result.ids) for result in results if isinstance(result, TokenizedInput))
            if max_request_tokens is not None:
                check_request_tokens(n_tokens, max_request_tokens, more_than=start < len(todo))
        return cast("list[TokenizedInput | InputTooLongError]", out)

    def _encode_long(
        self, index: int, text: str, prompt: str, truncate: bool, first_prefix: int
    ) -> TokenizedInput | InputTooLongError:
        """One long text: prefixes of growing length until one has more tokens than the limit. Each
        next length comes from the characters per token seen so far (with a quarter to spare), so the
        last prefix is little longer than needed; with ``truncate`` its encoding is the one cut."""
        over_limit = self.max_input_tokens + CUT_MARGIN_TOKENS
        prefix_chars = first_prefix
        while prefix_chars < len(text):
            window = text.rfind(" ", prefix_chars - CUT_SEARCH_CHARS, prefix_chars)
            prefix = text[: window if window > 0 else prefix_chars]
            encoding = self.tokenizer.encode(prompt + prefix, add_special_tokens=False)
            n_tokens = len(encoding.ids) + self.n_special_tokens
            if n_tokens > over_limit:
                if not truncate:
                    return InputTooLongError(
                        index,
                        f"more than {over_limit} tokens (counted in its first {len(prefix)} characters)",
                        self.max_input_tokens,
                    )
                return self._cut(encoding)
            prefix_chars = int(prefix_chars * min(4.0, max(1.25, 1.25 * over_limit / max(n_tokens, 1))))
        return self._encode([text], prompt, truncate, [index])[0]

    def _encode(
        self, texts: Sequence[str], prompt: str, truncate: bool, indexes: Sequence[int]
    ) -> list[TokenizedInput | InputTooLongError]:
        """``prompt + text`` for each text, whole, in one batch; ``indexes``: the inputs' numbers, for errors."""
        for i, text in zip(indexes, texts):
            if not isinstance(text, str):
                raise InvalidRequestError(f"input[{i}] must be a string", param="input")
            if not text:
                raise InvalidRequestError(f"input[{i}] is an empty string", param="input")
        full = [prompt + t for t in texts] if prompt else list(texts)
        limit = self.max_input_tokens
        out: list[TokenizedInput | InputTooLongError] = []
        for i, text, encoding in zip(indexes, full, self.tokenizer.encode_batch(full, add_special_tokens=True)):
            if len(encoding.ids) <= limit:
                out.append(TokenizedInput(encoding.ids))
            elif truncate:
                out.append(self._truncated(text))
            else:
                out.append(InputTooLongError(i, len(encoding.ids), limit))
        return out

    def _truncated(self, text: str) -> TokenizedInput:
        """``text`` cut as the tokenizer's own truncation does, so special tokens its post-processor adds
        are kept: content tokens to the limit minus those, then the post-processor (a copy of the
        tokenizer with truncation enabled would cost seconds per request)."""
        return self._cut(self.tokenizer.encode(text, add_special_tokens=False))

    def _cut(self, encoding: Encoding) -> TokenizedInput:
        """An encoding without special tokens cut to the limit less those, then post-processed."""
        encoding.truncate(self.max_input_tokens - self.n_special_tokens)
        return TokenizedInput(self.tokenizer.post_process(encoding).ids, truncated=True)

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


def check_request_tokens(n_tokens: int, max_request_tokens: int, more_than: bool = False) -> None:
    """Refuse a request of more than ``max_request_tokens`` tokens (``more_than``: counting stopped at ``n_tokens``)."""
    if n_tokens > max_request_tokens:
        raise InvalidRequestError(
            f"the request has {'more than ' if more_than else ''}{n_tokens} tokens in total; at most "
            f"{max_request_tokens} are allowed per request: split it",
            param="input",
        )


def _too_long(error: InputTooLongError, keep: bool) -> InputTooLongError:
    """``error``, kept in the results, or raised."""
    if not keep:
        raise error
    return error


def _raise_too_long(results: list[TokenizedInput | InputTooLongError]) -> list[TokenizedInput]:
    """``results``, or the first over-long input's error raised."""
    for result in results:
        if isinstance(result, InputTooLongError):
            raise result
    return cast("list[TokenizedInput]", results)


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
