"""Helpers shared by the benchmarks: compiled forward passes and timing."""

import json
import os
import platform
import statistics
import time

import keras
import numpy as np


def machine():
    """A short description of the machine the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def compiled_forward(model, torch_compile=True):
    """Returns `f(images) -> outputs`, compiled for the current backend.

    JAX: `jax.jit` of the stateless call; TensorFlow: `tf.function` with XLA;
    PyTorch: `torch.compile` (eager under `torch.no_grad` if that fails).
    """
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        @jax.jit
        def forward(images):
            outputs, _ = model.stateless_call(trainable, non_trainable, images)
            return outputs

        return lambda images: forward(images).block_until_ready()
    if backend == "tensorflow":
        import tensorflow as tf

        forward = tf.function(
            lambda images: model(images, training=False), jit_compile=True
        )
        return lambda images: forward(images).numpy()
    if backend == "torch":
        import torch

        def eager(images):
            with torch.no_grad():
                return model(images, training=False)

        if not torch_compile:
            return lambda images: eager(images).detach().cpu().numpy()
        compiled = torch.compile(eager)
        state = {"forward": compiled}

        def forward(images):
            try:
                return state["forward"](images).detach().cpu().numpy()
            except Exception as error:  # compilation needs a C++ toolchain
                if state["forward"] is eager:
                    raise
                print(
                    f"torch.compile failed ({type(error).__name__}); "
                    "timing eager mode"
                )
                state["forward"] = eager
                return eager(images).detach().cpu().numpy()

        return forward
    raise ValueError(f"Unsupported backend {backend!r}.")


def convert_images(images):
    """Converts a numpy batch into a tensor of the current backend."""
    return keras.ops.convert_to_tensor(images)


def time_interleaved(forwards, inputs, repeats, warmup=3):
    """Times several forward functions, alternating them to share the noise.

    Args:
        forwards: dict name -> callable.
        inputs: the argument passed to every callable.
        repeats: int. Timed calls per callable.
        warmup: int. Untimed calls first (compilation, caches).

    Returns:
        dict name -> list of seconds per call.
    """
    for forward in forwards.values():
        for _ in range(warmup):
            forward(inputs)
    times = {name: [] for name in forwards}
    for _ in range(repeats):
        for name, forward in forwards.items():
            start = time.perf_counter()
            forward(inputs)
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(seconds):
    return 1000.0 * statistics.median(seconds)


def random_images(batch, image_shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, size=(batch, *image_shape)).astype("float32")


def markdown_table(columns, rows):
    """A markdown table: `columns` is a list of (header, row -> str)."""
    lines = [
        "| " + " | ".join(header for header, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(cell(row) for _, cell in columns) + " |")
    return "\n".join(lines)


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_json(path, payload):
    """Writes a benchmark's JSON: `backend` and `machine`, then `payload`.

    Args:
        path: str or path-like; its folder is created.
        payload: JSON-serialisable dict.

    Returns:
        The path.
    """
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    payload = {
        "backend": keras.config.backend(),
        "machine": machine(),
        **payload,
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    print(f"wrote {path}")
    return path


def write_results(stem, markdown, payload, out_dir=None):
    """Writes `results/<stem>.md` and `results/<stem>.json`; prints the md.

    Args:
        stem: str. File name without extension.
        markdown: str. The report (title, notes, table).
        payload: JSON-serialisable dict; `machine` and `backend` are added.
        out_dir: folder (default: `benchmarks/results`).

    Returns:
        The two paths written.
    """
    out_dir = out_dir or RESULTS
    os.makedirs(out_dir, exist_ok=True)
    md_path = os.path.join(out_dir, f"{stem}.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(markdown.rstrip() + "\n")
    print(markdown)
    print(f"wrote {md_path}")
    return md_path, write_json(os.path.join(out_dir, f"{stem}.json"), payload)


def goal_status(rows, missed):
    """A speed benchmark's exit status: 1 (and a message) when the rows
    `missed(row)` says missed their goal on JAX, where the goals were set;
    else 0."""
    if keras.config.backend() != "jax":
        return 0
    failed = [row for row in rows if row.get("goal") and missed(row)]
    if failed:
        print(f"GOAL MISSED for {len(failed)} row(s)")
        return 1
    return 0
