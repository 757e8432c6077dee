"""The layers hold at run time: light modules import neither torch nor Ray, however indirectly.

import-linter (``lint-imports``, run by ``.ci/run``) checks the package's own imports; these
tests import each light module in a fresh interpreter, so a third-party package pulling in
torch (transformers does) is caught too.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

# module -> heavy packages it must never bring in
LIGHT_MODULES = {
    "serve_app": ("torch", "ray", "transformers"),
    "serve_app.serve.ingress": ("torch", "transformers"),
    "serve_app.serve.dispatch": ("torch", "transformers"),
    "serve_app.serve.autoscaling": ("torch", "transformers"),
    "serve_app.serve.metrics": ("torch", "transformers"),
    "serve_app.serve.proxy_fences": ("torch", "ray", "transformers"),
    "serve_app.api.protocol": ("torch", "ray", "transformers"),
    "serve_app.api.rendering": ("torch", "ray", "transformers"),
    "serve_app.api.http_errors": ("torch", "ray", "transformers"),
    "serve_app.api.token_ids": ("torch", "ray", "transformers"),
    "serve_app.batching.planning": ("torch", "ray", "transformers"),
    "serve_app.batching.lanes": ("torch", "ray", "transformers", "asyncio"),
    "serve_app.batching.scheduler": ("torch", "ray", "transformers"),
    "serve_app.core.checkpoint": ("torch", "ray", "transformers"),
    "serve_app.core.tokenization": ("torch", "ray", "transformers"),
    "serve_app.core.vectors": ("torch", "ray", "transformers"),
    "serve_app.core.quantization": ("torch", "ray", "transformers"),
    "serve_app.api.cohere": ("torch", "ray", "transformers"),
    "serve_app.placement": ("torch", "transformers"),
    "serve_app.config": ("torch", "ray", "transformers"),
    "serve_app.corpus.options": ("torch", "ray", "transformers", "pyarrow"),
}


def imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(m for m in sys.modules if '.' not in m)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("module", sorted(LIGHT_MODULES))
def test_light_module_imports_no_heavy_package(module):
    loaded = imported_after(f"import {module}")
    assert not loaded & set(LIGHT_MODULES[module]), f"{module} pulled in {sorted(loaded & set(LIGHT_MODULES[module]))}"


def test_the_ingress_path_validates_and_tokenises_a_request_without_torch(tiny_model_dir):
    """What an ingress replica does per request: config, tokenizer, validation, rendering."""
    loaded = imported_after(
        "import numpy as np\n"
        "from serve_app.api.protocol import EmbeddingRequest, validate_and_tokenize\n"
        "from serve_app.api.rendering import render_embeddings\n"
        "from serve_app.config import ServiceConfig\n"
        "from serve_app.core.checkpoint import read_model_files\n"
        "from serve_app.core.tokenization import TextTokenizer\n"
        f"config = ServiceConfig(model={str(tiny_model_dir)!r})\n"
        "files = read_model_files(config.model)\n"
        "tokenizer = TextTokenizer(files)\n"
        "req = EmbeddingRequest(model=config.model_id, input=['hello', 'world'], input_type='query')\n"
        "tokenized = validate_and_tokenize(req, config, tokenizer, files.hidden_size)\n"
        "assert tokenized.n_tokens > 2\n"
        "ids = EmbeddingRequest(model=config.model_id, input=[[15339, 1917]])\n"  # cl100k_base: "hello world"
        "assert validate_and_tokenize(ids, config, tokenizer, files.hidden_size).n_tokens > 1\n"
        "render_embeddings(np.ones((2, files.hidden_size), np.float32), 'base64', config.model_id, tokenized.n_tokens)\n"
    )
    assert "torch" not in loaded and "transformers" not in loaded
