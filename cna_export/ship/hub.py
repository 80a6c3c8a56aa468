"""Push an export to the Hugging Face Hub: a folder (checked against its model card first) or one GGUF file.

Uses huggingface_hub's upload API: `create_repo(exist_ok=True)`, `create_branch` for a revision, then
`upload_folder` (resumable chunked uploads of large files; `upload_large_folder` on huggingface_hub < 2 for very
large folders) or `upload_file` for a single .gguf. The token is huggingface_hub's own (`HF_TOKEN` or the saved
`hf auth login`); this module never reads, prints or logs it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cna_export.errors import CheckpointError, CnaExportError
from cna_export.io.hashing import sha256_file
from cna_export.io.source import ADAPTER_CONFIG
from cna_export.ship.card import CARD_NAME, check_card, check_repo_id, read_provenance

log = logging.getLogger(__name__)

# Above this size, huggingface_hub < 2 recommends upload_large_folder (resumable, several commits); from 2.0 on,
# upload_folder does that itself and upload_large_folder is gone.
LARGE_BYTES = 20 * 1024**3


def push(
    path: Path,
    repo_id: str,
    *,
    private: bool = False,
    branch: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    verify: bool = True,
) -> str:
    """Upload an exported folder (or one .gguf file) to a Hub model repository.

    The token comes from `token`, else `HF_TOKEN` or the saved `hf auth login` (huggingface_hub's usual order);
    it is never printed or logged.

    Args:
        path: an exported folder (with its card), or a single `.gguf` file.
        repo_id: `owner/name`; created if missing (`private` applies only then).
        private: create the repository as private.
        branch: push to this branch (created from main if missing) instead of main.
        commit_message: the commit title (default names the tool and the behaviour).
        verify: check that the files match the hashes in the card before uploading.

    Returns:
        The URL of the commit (or of the repository when the upload spans several commits).

    Example:
        >>> push(Path("qwen-no-refusal"), "me/qwen-no-refusal", private=True)
    """
    path = Path(path)
    check_repo_id(repo_id)
    single = path.is_file() and path.suffix == ".gguf"
    if not single and not path.is_dir():
        raise CheckpointError(f"{path} is neither an exported folder nor a .gguf file.", "check the path.")
    record = _check_before_push(path, single) if verify else None
    if not single:
        _warn_without_base_model(path)
    behaviour = record["edit"]["behaviour"] if record and "edit" in record else None
    # An adapter folder (cna_export.ship.adapter) is a model repository too, with the adapter's card.
    kind = "GGUF" if single else "adapter" if (path / ADAPTER_CONFIG).is_file() else "model"
    message = commit_message or f"Upload {kind} edited with cna-export" + (f" ({behaviour})" if behaviour else "")
    try:
        return _upload(path, repo_id, single, private, branch, message, token)
    except Exception as exc:
        raise _push_error(exc, repo_id) from None


def _warn_without_base_model(folder: Path) -> None:
    if (folder / CARD_NAME).is_file():
        from huggingface_hub import ModelCard

        if not ModelCard.load(folder / CARD_NAME, ignore_metadata_errors=True).data.base_model:
            log.warning("the model card has no base_model, so the Hub will not link this model to its source")


def _upload(
    path: Path, repo_id: str, single: bool, private: bool, branch: str | None, message: str, token: str | None
) -> str:
    """Create the repository (and branch) if needed and upload the file or folder; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if branch:
        api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")
    if single:
        info = api.upload_file(
            path_or_fileobj=str(path),
            path_in_repo=path.name,
            repo_id=repo_id,
            repo_type="model",
            revision=branch,
            commit_message=message,
        )
        return info.commit_url
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    if size > LARGE_BYTES and hasattr(api, "upload_large_folder"):
        api.upload_large_folder(
            repo_id=repo_id,
            folder_path=str(path),
            repo_type="model",
            revision=branch,
            private=private,
            ignore_patterns=[".*", "**/.*"],
        )
        return str(url)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(path),
        repo_type="model",
        revision=branch,
        commit_message=message,
        ignore_patterns=[".*", "**/.*"],
    )
    return info.commit_url


def _push_error(exc: Exception, repo_id: str) -> Exception:
    """A one-line error for a failed upload, or `exc` itself when it is not a network or server failure.

    Only the status code or the error's class goes into the message: an HTTP error's text can quote request
    headers, and the Authorization header holds the token."""
    from huggingface_hub.errors import HfHubHTTPError

    if not isinstance(exc, (HfHubHTTPError, OSError)) and _TRANSPORT.isdisjoint(_top_modules(exc)):
        return exc
    status = getattr(getattr(exc, "response", None), "status_code", None)
    fix = (
        "log in with `hf auth login` or set HF_TOKEN to a token with write access."
        if status in (401, 403)
        else "check the repository id, your network and your token's permissions."
    )
    return CnaExportError(f"Could not push to {repo_id} ({status or exc.__class__.__name__}).", fix)


# Packages whose exceptions mean "the network or the server failed" (huggingface_hub's HTTP clients).
_TRANSPORT = {"httpx", "httpx2", "httpcore", "requests", "urllib3", "hf_xet"}


def _top_modules(exc: BaseException) -> set[str]:
    return {cls.__module__.split(".")[0] for cls in type(exc).__mro__}


def _check_before_push(path: Path, single: bool) -> dict[str, Any] | None:
    """Hashes of the card against the files; a lone .gguf is checked against a sibling card that lists it."""
    if not single:
        return check_card(path)
    card = path.parent / CARD_NAME
    record = None
    if card.is_file():
        try:
            record = read_provenance(card)
        except CheckpointError:
            record = None
    if record is None or path.name not in record["files"]:
        log.warning("%s has no cna-export card listing it; pushing the file without one", path)
        return None
    listed = record["files"][path.name]
    if listed is None:
        log.warning("%s lists %s without a sha256; pushing it unchecked", card, path.name)
    elif sha256_file(path) != listed:
        raise CheckpointError(
            f"{path} does not match the sha256 in {card}.", "re-export it (or pass --no-verify to push it as it is)."
        )
    return record
