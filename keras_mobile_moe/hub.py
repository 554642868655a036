"""Hugging Face Hub transport: `hf://` handles, download into the Hub
cache, upload of a folder (layer 2 of the preset stack; see
`keras_mobile_moe.preset_format`).

Downloads and uploads go through `huggingface_hub` (imported only here, and
only when a handle is used), so its cache (`HF_HUB_CACHE` / `HF_HOME`),
revisions, tokens and offline mode (`HF_HUB_OFFLINE=1`) work as they do for
every other Hub library. Only the files of a keras-hub preset are fetched:
JSON configs, the `.weights.h5` files and the README, and for a timm
checkpoint its `model.safetensors` (pickle files are never fetched); nothing
in them is executed.
"""

import os
import re

from keras_mobile_moe import version

# The preset files, kept importable from here for existing callers.
from keras_mobile_moe.preset_format import CONFIG_FILE  # noqa: F401
from keras_mobile_moe.preset_format import CONFIG_FILES
from keras_mobile_moe.preset_format import IMAGE_CONVERTER_CONFIG_FILE  # noqa: F401
from keras_mobile_moe.preset_format import METADATA_FILE  # noqa: F401
from keras_mobile_moe.preset_format import MODEL_CARD_MARKER  # noqa: F401
from keras_mobile_moe.preset_format import MODEL_WEIGHTS_FILE  # noqa: F401
from keras_mobile_moe.preset_format import PREPROCESSOR_CONFIG_FILE  # noqa: F401
from keras_mobile_moe.preset_format import PRESET_FILES  # noqa: F401
from keras_mobile_moe.preset_format import README_FILE
from keras_mobile_moe.preset_format import SAFETENSORS_FILE
from keras_mobile_moe.preset_format import TASK_CONFIG_FILE  # noqa: F401
from keras_mobile_moe.preset_format import TASK_WEIGHTS_FILE  # noqa: F401
from keras_mobile_moe.preset_format import WEIGHTS_FILES

HF_SCHEME = "hf://"
HANDLE_FORM = (
    "'hf://org/repo' or 'hf://org/repo/revision' (org and repo: letters, "
    "digits, '-', '_', '.'; revision: a branch, tag or commit)"
)
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")
_REVISION_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def parse_hf_handle(handle, argument="preset"):
    """Splits `hf://org/repo[/revision]` into a repo id and a revision.

    Rejects anything that could leave the Hub cache: `..`, `.` or empty
    segments, absolute paths, backslashes, `~`, `%` and other characters
    outside the Hub's naming rules.

    Args:
        handle: str. The handle.
        argument: str. The argument name used in error messages.

    Returns:
        A tuple `(repo_id, revision)`; `revision` is None when absent
        (the Hub's default branch).

    Example:

    >>> parse_hf_handle("hf://keras-mobile-moe/tiny_e10/v1.0")
    ('keras-mobile-moe/tiny_e10', 'v1.0')
    >>> parse_hf_handle("hf://org/repo")
    ('org/repo', None)
    """
    if not isinstance(handle, str):
        raise ValueError(
            f"Received: {argument}={handle!r}. Expected a Hugging Face "
            f"handle {HANDLE_FORM}."
        )
    if not handle.startswith(HF_SCHEME):
        scheme = handle.split("://")[0] + "://" if "://" in handle else None
        raise ValueError(
            f"Received: {argument}={handle!r}"
            + (f" (scheme {scheme!r} is not supported)" if scheme else "")
            + f". Expected a Hugging Face handle {HANDLE_FORM}."
        )
    rest = handle[len(HF_SCHEME) :]
    reason = None
    if rest.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", rest):
        reason = "it holds an absolute path"
    elif "\\" in rest:
        reason = "it holds a backslash"
    elif any(part in ("..", ".") for part in rest.split("/")):
        reason = "it holds a '..' or '.' path segment"
    elif "" in rest.split("/"):
        reason = "it has an empty path segment"
    parts = rest.split("/")
    if reason is None and len(parts) < 2:
        reason = "it names a repo without its organisation"
    if reason is None:
        org, repo, revision_parts = parts[0], parts[1], parts[2:]
        for part in (org, repo):
            if not _REPO_PART.fullmatch(part) or "--" in part or ".." in part:
                reason = f"{part!r} is not a valid organisation or repo name"
                break
        for part in revision_parts:
            if reason is None and (
                not _REVISION_PART.fullmatch(part)
                or ".." in part
                or part.endswith(".lock")
            ):
                reason = f"{part!r} is not a valid revision segment"
    if reason is not None:
        raise ValueError(
            f"Received: {argument}={handle!r}, which is not a valid Hugging "
            f"Face handle: {reason}. Expected {HANDLE_FORM}; no '..', no "
            "absolute paths."
        )
    revision = "/".join(revision_parts) or None
    return f"{org}/{repo}", revision


def import_huggingface_hub(purpose):
    """Imports `huggingface_hub`, or raises an actionable `ImportError`."""
    try:
        import huggingface_hub
    except ImportError as error:
        raise ImportError(
            f"keras_mobile_moe needs the `huggingface_hub` package to "
            f"{purpose}. Install it with `pip install huggingface_hub` (or "
            "`pip install keras-mobile-moe[hub]`)."
        ) from error
    return huggingface_hub


def _is_offline():
    from huggingface_hub import constants

    if hasattr(constants, "is_offline_mode"):
        return bool(constants.is_offline_mode())
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def download_preset(handle, load_weights=True):
    """Fetches a preset from the Hub into the Hugging Face cache.

    Uses `huggingface_hub.snapshot_download`, so a cached snapshot is reused,
    revisions are honoured and `HF_HUB_OFFLINE=1` reads the cache only.

    Args:
        handle: str. `hf://org/repo[/revision]`.
        load_weights: bool. Whether to fetch the `.weights.h5` files too.

    Returns:
        The local snapshot folder (a keras-hub preset directory).

    Example:

    >>> download_preset("hf://org/../etc")
    Traceback (most recent call last):
    ...
    ValueError: Received: preset='hf://org/../etc',
    which is not a valid Hugging Face handle: it holds a '..' or '.' path
    segment. ...
    """
    repo_id, revision = parse_hf_handle(handle)
    hub = import_huggingface_hub(f"load {handle!r}")
    from huggingface_hub import constants
    from huggingface_hub import errors

    patterns = list(CONFIG_FILES) + [README_FILE]
    if load_weights:
        # timm checkpoints keep their tensors in model.safetensors; pickle
        # files (pytorch_model.bin) are never fetched.
        patterns += list(WEIGHTS_FILES) + [SAFETENSORS_FILE]
    where = f"revision {revision!r}" if revision else "the default branch"
    try:
        directory = hub.snapshot_download(
            repo_id=repo_id,
            revision=revision,
            allow_patterns=patterns,
            library_name="keras_mobile_moe",
            library_version=version.__version__,
        )
        return directory
    except errors.LocalEntryNotFoundError as error:
        cache = constants.HF_HUB_CACHE
        if _is_offline():
            raise FileNotFoundError(
                f"Cannot load {handle!r}: offline mode is on (HF_HUB_OFFLINE="
                f"1) and the Hugging Face cache ({cache}) holds no complete "
                f"snapshot of {repo_id!r} at {where}. Load it once with "
                "internet access (HF_HUB_OFFLINE unset) to cache it, point "
                "HF_HUB_CACHE at a cache that has it, or pass a local preset "
                f"directory. Details: {error}"
            ) from error
        raise FileNotFoundError(
            f"Cannot load {handle!r}: the Hugging Face Hub could not be "
            f"reached and the cache ({cache}) holds no complete snapshot of "
            f"{repo_id!r} at {where}. Check the network connection, or pass "
            f"a local preset directory. Details: {error}"
        ) from error
    except errors.GatedRepoError as error:
        raise PermissionError(
            f"Cannot load {handle!r}: the repo is gated. Accept its terms on "
            "the Hub and log in (`hf auth login` or HF_TOKEN)."
        ) from error
    except errors.RepositoryNotFoundError as error:
        raise FileNotFoundError(
            f"Cannot load {handle!r}: no repo {repo_id!r} on the Hugging "
            "Face Hub (or it is private and no valid token was given). "
            f"Expected {HANDLE_FORM}."
        ) from error
    except errors.RevisionNotFoundError as error:
        raise FileNotFoundError(
            f"Cannot load {handle!r}: repo {repo_id!r} has no revision "
            f"{revision!r} (a branch, tag or commit)."
        ) from error


def list_repo_files(handle):
    """The file names of the repo at the handle's revision, or None in
    offline mode (`HF_HUB_OFFLINE=1`), where the Hub is not asked.

    Args:
        handle: str. `hf://org/repo[/revision]`.

    Returns:
        A list of file names, or None.

    Example:

    >>> list_repo_files("hf://org/../etc")
    Traceback (most recent call last):
    ...
    ValueError: Received: preset='hf://org/../etc',
    which is not a valid Hugging Face handle: it holds a '..' or '.' path
    segment. ...
    """
    repo_id, revision = parse_hf_handle(handle)
    hub = import_huggingface_hub(f"load {handle!r}")
    if _is_offline():
        return None
    return hub.list_repo_files(repo_id, revision=revision)


def upload_folder(uri, folder, private=None, token=None, commit_message=None):
    """Uploads the files of a folder to `hf://org/repo[/branch]` in one
    commit, creating the repo (and the branch) if needed.

    Transport only: `kmm.upload_preset` checks the preset and writes its
    model card before it calls this.

    Args:
        uri: str. `hf://org/repo` or `hf://org/repo/branch`.
        folder: the local folder whose files are uploaded.
        private: bool or None. Visibility of a newly created repo.
        token: str or None. A Hub token (default: the logged-in one).
        commit_message: str or None.

    Returns:
        The `huggingface_hub` commit info of the upload.

    Example:

    >>> upload_folder("hf://org/../repo", ".")
    Traceback (most recent call last):
    ...
    ValueError: Received: uri='hf://org/../repo',
    which is not a valid Hugging Face handle: it holds a '..' or '.' path
    segment. ...
    """
    repo_id, revision = parse_hf_handle(uri, argument="uri")
    files = sorted(os.listdir(folder))
    hub = import_huggingface_hub(f"upload to {uri!r}")
    api = hub.HfApi(
        token=token,
        library_name="keras_mobile_moe",
        library_version=version.__version__,
    )
    repo = api.create_repo(
        repo_id=repo_id, repo_type="model", private=private, exist_ok=True
    )
    repo_id = getattr(repo, "repo_id", None) or repo_id
    if revision is not None:
        api.create_branch(
            repo_id=repo_id,
            branch=revision,
            repo_type="model",
            exist_ok=True,
        )
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type="model",
        revision=revision,
        commit_message=commit_message
        or f"Upload keras_mobile_moe preset ({', '.join(files)})",
    )
