"""A real Hugging Face cache in a temp dir, and a fake `HfApi` that uploads
into it.

`write_snapshot` lays files out the way `huggingface_hub` does when it
downloads a repo (see its cache guide): `models--{org}--{repo}/blobs/{etag}`
(the git blob sha1 for small files, the sha256 for LFS files such as
`.h5`), `snapshots/{commit}/{file}` as relative symlinks into `blobs/`, and
`refs/{revision}` holding the commit hash. `huggingface_hub.scan_cache_dir`
and `snapshot_download(..., HF_HUB_OFFLINE=1)` read it like a real cache.
"""

import hashlib
import os


def repo_folder(repo_id):
    return "models--" + repo_id.replace("/", "--")


def _etag(name, data):
    if name.endswith(".h5"):  # stored with git LFS on the Hub
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_snapshot(cache_dir, repo_id, folder, revision="main"):
    """Copies the files of `folder` into the cache as one commit of
    `repo_id` at `revision`; returns the commit hash."""
    names = sorted(
        n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))
    )
    contents = {}
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            contents[name] = f.read()
    tree = hashlib.sha1()
    for name in names:
        tree.update(
            name.encode() + b"\0" + _etag(name, contents[name]).encode()
        )
    tree.update(revision.encode())
    commit = tree.hexdigest()
    storage = os.path.join(cache_dir, repo_folder(repo_id))
    snapshot = os.path.join(storage, "snapshots", commit)
    os.makedirs(os.path.join(storage, "blobs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    for name, data in contents.items():
        etag = _etag(name, data)
        blob = os.path.join(storage, "blobs", etag)
        if not os.path.exists(blob):
            with open(blob, "wb") as f:
                f.write(data)
        link = os.path.join(snapshot, name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    ref = os.path.join(storage, "refs", revision)
    os.makedirs(os.path.dirname(ref), exist_ok=True)
    with open(ref, "w") as f:
        f.write(commit)
    return commit


class FakeHfApi:
    """Records the calls `kmm.upload_preset` makes and "uploads" into a
    local Hugging Face cache instead of the Hub."""

    calls = []
    cache_dir = None

    def __init__(
        self, token=None, library_name=None, library_version=None, **kwargs
    ):
        FakeHfApi.calls.append(
            ("HfApi", {"token": token, "library_name": library_name})
        )

    def create_repo(
        self, repo_id, repo_type=None, private=None, exist_ok=False, **kwargs
    ):
        FakeHfApi.calls.append(
            (
                "create_repo",
                {
                    "repo_id": repo_id,
                    "repo_type": repo_type,
                    "private": private,
                    "exist_ok": exist_ok,
                },
            )
        )

        class RepoUrl(str):
            pass

        url = RepoUrl(f"https://huggingface.co/{repo_id}")
        url.repo_id = repo_id
        return url

    def create_branch(
        self, repo_id, branch, repo_type=None, exist_ok=False, **kwargs
    ):
        FakeHfApi.calls.append(
            (
                "create_branch",
                {"repo_id": repo_id, "branch": branch, "exist_ok": exist_ok},
            )
        )

    def upload_folder(
        self,
        repo_id,
        folder_path,
        repo_type=None,
        revision=None,
        commit_message=None,
        **kwargs,
    ):
        files = sorted(os.listdir(folder_path))
        readme = open(os.path.join(folder_path, "README.md")).read()
        FakeHfApi.calls.append(
            (
                "upload_folder",
                {
                    "repo_id": repo_id,
                    "revision": revision,
                    "files": files,
                    "commit_message": commit_message,
                    "readme": readme,
                },
            )
        )
        commit = write_snapshot(
            FakeHfApi.cache_dir, repo_id, folder_path, revision or "main"
        )
        return {"commit": commit}
