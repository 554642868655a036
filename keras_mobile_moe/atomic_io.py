"""Atomic file and directory writes: nothing lost, nothing half-written.

Every file the library produces (presets, `.tflite` files, expert-split
files, training results) is written into a temporary sibling in the same
directory, flushed and fsynced, then renamed over the target with
`os.replace` (atomic on POSIX and Windows), and the directory entry is
fsynced. A failure or a kill at any point leaves either the previous file or
the new one, never a truncated mix; temporary siblings of a killed write
start with `.` and carry `ATOMIC_TAG` so a later write can recognise them.

Directories (a preset is several files that only load together) are swapped
as a whole: `replace_directory` exchanges a fully written staging directory
with the target in one `renameat2(RENAME_EXCHANGE)` call where the kernel
offers it (Linux), else with two renames that keep the previous directory
under a `.…kmm-old-…` name until the new one is in place.

Example:

>>> import os, tempfile
>>> folder = tempfile.mkdtemp()
>>> path = os.path.join(folder, "results.json")
>>> write_json(path, {"top1": 0.25})
>>> with atomic_write(path, "w") as f:   # replaces results.json at once
...     _ = f.write('{"top1": 0.5}')
>>> open(path).read()
'{"top1": 0.5}'
>>> sorted(os.listdir(folder))
['results.json']
"""

import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile

ATOMIC_TAG = ".kmm-"


def _fsync_directory(directory):
    """fsyncs a directory entry (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root):
    """fsyncs every file and directory under `root` (a staging directory)."""
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        _fsync_directory(directory)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _give_mode(path, like, directory=False):
    """Gives `path` the permissions of `like` if it exists, else those a
    plain `open` / `mkdir` would (mkstemp and mkdtemp make them private)."""
    try:
        mode = os.stat(like).st_mode & 0o7777
    except OSError:
        mode = (0o777 if directory else 0o666) & ~_umask()
    os.chmod(path, mode)


def temporary_sibling(path, kind="tmp"):
    """A fresh, unused name next to `path` (same directory, same filesystem)."""
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(
        prefix=f".{name}{ATOMIC_TAG}{kind}-", dir=directory
    )
    os.close(fd)
    return temporary


def _check_target(path, argument):
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise ValueError(
            f"Received: {argument}={path!r}. Expected a file path (str or "
            "path-like)."
        )
    if os.path.isdir(path):
        raise ValueError(
            f"Received: {argument}={path!r}, which is a directory. Expected "
            "the path of a file to write."
        )
    return path


@contextlib.contextmanager
def atomic_path(path, argument="path"):
    """Yields a temporary sibling path to write; renamed over `path` on
    success, removed on failure (the previous `path` is left untouched).

    For writers that take a path (h5py, `np.save`, TFLite converters).

    Args:
        path: str or path-like. The file to produce.
        argument: name of the argument in error messages.
    """
    path = _check_target(path, argument)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_leftovers(path, kinds=("tmp",))
    temporary = temporary_sibling(path)
    try:
        yield temporary
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        _give_mode(temporary, path)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    _fsync_directory(directory)


@contextlib.contextmanager
def atomic_write(path, mode="wb", encoding=None, argument="path"):
    """Opens a temporary sibling of `path` for writing; on a clean exit it
    is flushed, fsynced and renamed over `path`.

    Args:
        path: str or path-like. The file to produce.
        mode: `"wb"` or `"w"`.
        encoding: text encoding for `"w"` (default UTF-8).
        argument: name of the argument in error messages.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"Received: mode={mode!r}. Expected 'w' or 'wb'.")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path, argument) as temporary:
        with open(temporary, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_bytes(path, data, argument="path"):
    """Writes `data` (bytes) to `path` atomically."""
    with atomic_write(path, "wb", argument=argument) as f:
        f.write(data)


def write_text(path, text, argument="path"):
    """Writes `text` to `path` atomically (UTF-8)."""
    with atomic_write(path, "w", argument=argument) as f:
        f.write(text)


def write_json(path, obj, indent=2, argument="path"):
    """Writes `obj` as JSON (plus a newline) to `path` atomically."""
    write_text(path, json.dumps(obj, indent=indent) + "\n", argument=argument)


def copy_file(source, target):
    """Copies `source` to `target` atomically (contents only)."""
    with atomic_path(target, "target") as temporary:
        shutil.copyfile(source, temporary)


# --- directories ------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first, second):
    """Atomically swaps two paths with Linux renameat2(RENAME_EXCHANGE).
    Returns False where the call is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    result = renameat2(
        _AT_FDCWD,
        os.fsencode(first),
        _AT_FDCWD,
        os.fsencode(second),
        _RENAME_EXCHANGE,
    )
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), first)


def staging_directory(target):
    """Creates an empty staging directory next to `target`."""
    target = os.path.abspath(os.fspath(target))
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}{ATOMIC_TAG}new-", dir=parent)
    _give_mode(staging, target, directory=True)
    return staging


def remove_leftovers(target, kinds=("tmp", "new", "old")):
    """Removes temporary files, staging directories and old copies left
    next to `target` by killed writes (only names made by this module)."""
    target = os.path.abspath(os.fspath(target))
    parent, name = os.path.split(target)
    prefixes = tuple(f".{name}{ATOMIC_TAG}{kind}-" for kind in kinds)
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        if not entry.startswith(prefixes):
            continue
        path = os.path.join(parent, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)


def replace_directory(staging, target):
    """Puts the fully written `staging` directory at `target` in one step.

    `target` either does not exist, is an empty directory, or is a directory
    that `staging` replaces as a whole (copy or link into `staging` first
    what must survive). After a kill at any moment, `target` is the old or
    the new directory (with the two-rename fallback, the old one may instead
    sit under a `.…kmm-old-…` sibling for an instant).
    """
    staging = os.path.abspath(os.fspath(staging))
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target)
    fsync_tree(staging)
    if not os.path.lexists(target):
        os.rename(staging, target)
        _fsync_directory(parent)
        return
    if not os.listdir(target):
        os.rename(staging, target)  # replaces an empty directory
        _fsync_directory(parent)
        return
    if _holds_working_directory(target):
        # Swapping the directory would leave this process in the removed
        # old one: replace its entries one by one instead (each atomically).
        _replace_entries(staging, target)
        return
    if _exchange(staging, target):
        _fsync_directory(parent)
        shutil.rmtree(staging, ignore_errors=True)  # now the old directory
        return
    old = tempfile.mkdtemp(
        prefix=f".{os.path.basename(target)}{ATOMIC_TAG}old-", dir=parent
    )
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    _fsync_directory(parent)
    shutil.rmtree(old, ignore_errors=True)


def _holds_working_directory(target):
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:
        return False
    target = os.path.realpath(target)
    return cwd == target or cwd.startswith(target + os.sep)


def _replace_entries(staging, target):
    """Moves every entry of `staging` over the same name in `target` with
    `os.replace` (atomic per file), removes the entries of `target` that
    `staging` lacks, then removes `staging`."""
    names = set(os.listdir(staging))
    for name in sorted(names):
        source, destination = (
            os.path.join(staging, name),
            os.path.join(target, name),
        )
        if os.path.isdir(destination) and not os.path.islink(destination):
            if os.path.samefile(destination, os.getcwd()) or (
                _holds_working_directory(destination)
            ):
                continue  # the user's folder we are in: its files are linked
            old = tempfile.mkdtemp(
                prefix=f".{name}{ATOMIC_TAG}old-", dir=target
            )
            os.rmdir(old)
            os.rename(destination, old)
            os.rename(source, destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(source, destination)
    for name in os.listdir(target):
        if name not in names and ATOMIC_TAG not in name:
            path = os.path.join(target, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
    _fsync_directory(target)
    shutil.rmtree(staging, ignore_errors=True)


def link_or_copy_tree(source, target):
    """Reproduces `source` (a file or directory) at `target` with hard
    links (no data copied; the files stay shared), copying where links are
    not possible."""

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if os.path.isdir(source) and not os.path.islink(source):
        shutil.copytree(source, target, symlinks=True, copy_function=link)
    elif os.path.islink(source):
        os.symlink(os.readlink(source), target)
    else:
        link(source, target)
