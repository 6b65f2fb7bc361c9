"""Finding a checkpoint: a local directory as it is, or a Hugging Face hub id downloaded (or found
in the hub cache when offline) with only the files glmchat reads."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import CheckpointError

DEFAULT_MODEL = "THUDM/chatglm3-6b"
TOKENIZER_MODELS = ("tokenizer.model", "tokenizer.json", "ice_text.model")  # what a tokenizer is built from (one of them)
TOKENIZER_FILES = (*TOKENIZER_MODELS, "tokenizer_config.json", "chat_template.jinja")  # GLM-4-0414: the template file


def resolve_checkpoint(path_or_id: str | os.PathLike, *, weights: bool = True, revision: str | None = None) -> Path:
    """A local directory holding the checkpoint: the path itself, or a hub snapshot."""
    text = os.fspath(path_or_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{text} is a file; pass the checkpoint directory that holds config.json")
    if not _looks_like_hub_id(text):
        raise CheckpointError(
            f"no checkpoint directory at {text}; pass an existing directory with config.json "
            f"or a Hugging Face repo id like {DEFAULT_MODEL}"
        )
    return _download(text, weights=weights, revision=revision)


def _looks_like_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", text)) and not text.startswith((".", "/", "~"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _download(repo_id: str, *, weights: bool, revision: str | None) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    if _hub_reachable():
        try:
            files = HfApi().list_repo_files(repo_id, revision=revision)
            patterns = ["config.json", *TOKENIZER_FILES]
            if weights:
                patterns += _weight_patterns(files, repo_id)
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        except CheckpointError:
            raise
        except Exception as e:  # the hub's errors vary by version; all mean "could not fetch"
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    else:
        reason = "the hub cannot be reached (offline, or HF_HUB_OFFLINE is set)"
    try:  # a snapshot downloaded earlier still works offline
        cached = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        if (cached / "config.json").exists():
            return cached
    except Exception:
        pass
    raise CheckpointError(
        f"could not download {repo_id!r} from the Hugging Face hub ({reason}). Download it where the "
        f"hub is reachable (e.g. `hf download {repo_id} --local-dir ./{repo_id.split('/')[-1]}`) and pass "
        "that directory instead of the id, or use --random-weights (random_weights=True in Python) to try "
        "glmchat without it."
    )


def _weight_patterns(files: list[str], repo_id: str) -> list[str]:
    """Only one weight format: safetensors when the repo has it, else .bin shards."""
    if any(f.endswith(".safetensors") for f in files):
        return ["*.safetensors", "model.safetensors.index.json"]
    if any(f.endswith(".bin") for f in files):
        return ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
    raise CheckpointError(f"{repo_id} on the hub has no .safetensors or .bin weights")
