"""Keeps TensorFlow's and LiteRT's native log lines off the command line.

TensorFlow 2.21 prints its start-up lines (oneDNN, CUDA probing, CPU
features) from C++ straight to file descriptor 2 while it is imported,
before absl logging is initialised, so `TF_CPP_MIN_LOG_LEVEL` does not hide
them. `python -m keras_mobile_moe.export` imports the package (and with it
TensorFlow) before its `__main__` runs, so the package's `__init__` calls
`quiet_export_cli()` first.

The filter is a child process reading fd 2 through a pipe: it drops the
known log lines and passes everything else on, and it keeps draining the
pipe if the parent dies (a crash's last lines are not lost in a buffer).
"""

import atexit
import os
import subprocess
import sys

# Lines that start with one of these are dropped. Error-level native lines
# (E0000) pass, except the CUDA probe's on machines without a GPU.
LOG_PREFIXES = (
    "I0000",
    "W0000",
    "WARNING: All log messages before absl",
    "To enable the following instructions",
    "fully_quantize:",
    "INFO: Created TensorFlow Lite",
    "INFO: Initialized TensorFlow Lite",
)
BENIGN_ERRORS = ("cuda_platform.cc", "cuInit")

_FILTER = """
import os, sys
prefixes = tuple(p.encode() for p in sys.argv[1].split("|"))
benign = tuple(p.encode() for p in sys.argv[2].split("|"))
for line in sys.stdin.buffer:
    if line.startswith(prefixes) or (
        line.startswith(b"E0000") and any(b in line for b in benign)
    ):
        continue
    os.write(1, line)
"""

_restore = None


def hide_native_logs(prefixes=LOG_PREFIXES):
    """Routes fd 2 through a filter process that drops native log lines.

    Idempotent: a second call returns the first call's `restore`.

    Args:
        prefixes: line starts to drop (see `LOG_PREFIXES`).

    Returns:
        A function that puts fd 2 back and waits until the filter has passed
        on every line written so far (also registered with `atexit`).
    """
    global _restore
    if _restore is not None:
        return _restore
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _FILTER,
            "|".join(prefixes),
            "|".join(BENIGN_ERRORS),
        ],
        stdin=read_end,
        stdout=original,
        stderr=original,
        close_fds=True,
    )
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)

    def restore():
        global _restore
        if _restore is not restore:
            return
        _restore = None
        sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last write end: EOF
        os.close(original)
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass  # a grandchild still holds the pipe; the filter drains it

    _restore = restore
    atexit.register(restore)
    return restore


def running_export_cli(argv=None):
    """Whether this process is `python -m keras_mobile_moe.export`."""
    argv = list(getattr(sys, "orig_argv", []) if argv is None else argv)
    return any(
        a == "-m" and b == "keras_mobile_moe.export"
        for a, b in zip(argv, argv[1:])
    )


def quiet_export_cli():
    """Before TensorFlow is imported: hides its native log lines when this
    process is the export command line (unless it runs with `--tf_logs`, or
    as `to_tflite`'s conversion subprocess, whose stderr is read for the
    error)."""
    if not running_export_cli():
        return
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = sys.orig_argv
    if os.environ.get("KMM_EXPORT_SUBPROCESS") or any(
        a in ("--tf_logs", "--tf_logs=true", "--tf_logs=True", "--tf_logs=1")
        for a in argv
    ):
        return
    hide_native_logs()
