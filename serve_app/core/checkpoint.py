"""Find a model's files (local directory or hub id) and read what they say.

Reads the sentence-transformers layout when present (``modules.json``,
``sentence_bert_config.json``, ``1_Pooling/config.json``,
``config_sentence_transformers.json``) and falls back to KaLM v2's values
(mean pooling, L2 normalisation) for a bare transformers directory.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelLoadError

log = logging.getLogger(__name__)

#: Files fetched from the hub. Python files are never fetched: no remote code runs.
HUB_FILE_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "merges.txt",
    "*/config.json",
]

KALM_QUERY_INSTRUCTION = "Given a query, retrieve documents that answer the query"
SYMMETRIC_INSTRUCTION = "Retrieve semantically similar text"


def instruction_prompt(instruction: str) -> str:
    """KaLM's query template prefix; note the spaces around the newline."""
    return f"Instruct: {instruction} \n Query: "


@dataclass(frozen=True)
class ModelFiles:
    """A model directory on local disk and the pipeline its files describe."""

    path: Path
    config: dict
    pooling: str = "mean"  # mean | cls | lasttoken
    normalize: bool = True
    max_seq_length: int | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    is_standin: bool = False

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    @property
    def is_qwen2(self) -> bool:
        return is_qwen2_config(self.config)

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def max_input_tokens(self) -> int:
        """Longest input the model takes: the ST ``max_seq_length``, else the position limit."""
        if self.max_seq_length:
            return int(self.max_seq_length)
        return int(self.config.get("max_position_embeddings") or 512)


def is_qwen2_config(config: dict) -> bool:
    """KaLM v2's repo may name a custom architecture; its backbone is Qwen2 either way."""
    archs = config.get("architectures") or []
    return config.get("model_type") == "qwen2" or any("Qwen2" in a for a in archs)


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id downloaded (or found in the HF cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    name = str(name_or_path)
    if path.is_absolute() or name.startswith(".") or name.count("/") != 1:
        raise ModelLoadError(f"model directory {name!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=HUB_FILE_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated, ...
        raise ModelLoadError(
            f"could not get {name!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}). Point at a local copy "
            f"instead: download it where the hub is reachable (`hf download {name} "
            f"--local-dir DIR`), copy DIR here and set KALM_MODEL=DIR (or pass the directory "
            f"as the model). To try the service without the model, serve a stand-in with random "
            f"weights: `.venv/bin/python -m serve_app.testing.standin /tmp/kalm-standin --size tiny`, then "
            f"KALM_MODEL=/tmp/kalm-standin."
        ) from exc


def _read_json(path: Path) -> dict | list | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc


def _read_json_object(path: Path) -> dict:
    """A settings file that holds one JSON object; ``{}`` when there is none."""
    doc = _read_json(path)
    if doc is not None and not isinstance(doc, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(doc).__name__}, not an object")
    return doc or {}


def read_model_files(name_or_path: str | os.PathLike) -> ModelFiles:
    """Resolve ``name_or_path`` and read its pipeline description."""
    path = resolve_model_dir(name_or_path)
    config = _read_json(path / "config.json")
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} has no config.json: not a transformers model directory")

    pooling, normalize = "mean", True
    modules = _read_json(path / "modules.json")
    if isinstance(modules, list):
        types = [m.get("type", "") for m in modules]
        normalize = any(t.endswith("Normalize") for t in types)
        pooling_dir = next((m.get("path", "") for m in modules if m.get("type", "").endswith("Pooling")), None)
        if pooling_dir is not None:
            pooling = _pooling_mode(_read_json_object(path / pooling_dir / "config.json"))
        unsupported = [t for t in types if not t.endswith(("Transformer", "Pooling", "Normalize"))]
        if unsupported:
            raise ModelLoadError(f"unsupported sentence-transformers modules in {path}: {unsupported}")

    st_config = _read_json_object(path / "sentence_bert_config.json")
    prompts_config = _read_json_object(path / "config_sentence_transformers.json")
    prompts = dict(prompts_config.get("prompts") or {})
    if is_qwen2_config(config):
        # KaLM v2's documented defaults when the directory does not name them.
        prompts.setdefault("query", instruction_prompt(KALM_QUERY_INSTRUCTION))
        prompts.setdefault("document", "")

    return ModelFiles(
        path=path,
        config=config,
        pooling=pooling,
        normalize=normalize,
        max_seq_length=st_config.get("max_seq_length"),
        prompts=prompts,
        default_prompt_name=prompts_config.get("default_prompt_name"),
        is_standin=bool(config.get("kalm_serve_standin")),
    )


def _pooling_mode(cfg: dict) -> str:
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_lasttoken"):
        return "lasttoken"
    if cfg.get("pooling_mode"):  # newer ST writes a single string
        mode = str(cfg["pooling_mode"]).lower()
        if mode in ("mean", "cls", "lasttoken"):
            return mode
    raise ModelLoadError(f"unsupported pooling configuration: {cfg}")


def main() -> None:
    """``python -m serve_app.core.checkpoint [MODEL]``: check a model can be found, before starting Ray."""
    import sys

    from .. import environment

    model = sys.argv[1] if len(sys.argv) > 1 else environment.model()
    try:
        files = read_model_files(model)
    except ModelLoadError as exc:
        sys.exit(f"error: {exc}")
    print(f"model {model!r}: {files.path}{' (stand-in, RANDOM weights)' if files.is_standin else ''}")


if __name__ == "__main__":
    main()
