"""TFLite/LiteRT size and single-image latency: dense ViT, Mobile V-MoE and
MoNE at equal scale, for every quantization mode, at 1 and 2 threads.

For each scale (default 6x64, 12x64, 12x192 at 224x224, patch 32), the dense
preset, its MoE twin (E=10, k=1) and its MoNE twin (budget of the preset) are
exported on the TensorFlow backend, checked for builtin ops only, and timed
with the `ai_edge_litert` interpreter (XNNPACK), alternating the models so
they share the machine's noise. Accuracy on the CIFAR-100 test split is
reported where a trained preset exists (none is published yet).

Writes benchmarks/results/tflite.md and tflite.json.

Usage:
    KERAS_BACKEND=tensorflow python benchmarks/tflite_latency.py [--repeats 30]
"""

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ["KERAS_BACKEND"] = "tensorflow"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import keras_mobile_moe as kmm  # noqa: E402
from common import machine  # noqa: E402
from keras_mobile_moe.export import TFLiteClassifier  # noqa: E402
from keras_mobile_moe.export import to_tflite  # noqa: E402
from keras_mobile_moe.export.__main__ import calibration_images  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
MODES = ("none", "float16", "dynamic", "int8")


def build(kind, scale):
    if kind == "dense":
        return kmm.MobileVMoE.from_preset(scale, load_weights=False)
    if kind == "moe":
        return kmm.MobileVMoE.from_preset(f"{scale}_e10", load_weights=False)
    return kmm.MoNE.from_preset(f"{scale}_mone", load_weights=False)


def time_interleaved(runners, image, repeats):
    for runner in runners.values():
        for _ in range(3):
            runner(image)
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner(image)
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * float(np.median(t)) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scales", nargs="+", default=["6x64", "12x64", "12x192"])
    parser.add_argument("--kinds", nargs="+", default=["dense", "moe", "mone"])
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--calibration", type=int, default=100)
    args = parser.parse_args()

    rows = []
    load_before = os.getloadavg()[0]
    workdir = pathlib.Path(tempfile.mkdtemp())
    for scale in args.scales:
        models = {kind: build(kind, scale) for kind in args.kinds}
        flops = {kind: kmm.count_flops(m) for kind, m in models.items()}
        calibration = calibration_images(models["dense"], args.calibration)
        image = calibration[:1]
        for mode in args.modes:
            paths, sizes = {}, {}
            for kind, model in models.items():
                report = to_tflite(
                    model,
                    workdir / f"{scale}_{kind}_{mode}.tflite",
                    quantization=mode,
                    representative_data=calibration if mode == "int8" else None,
                )
                paths[kind], sizes[kind] = report["path"], report["bytes"]
            for threads in (1, 2):
                runners = {
                    kind: TFLiteClassifier(path, num_threads=threads)
                    for kind, path in paths.items()
                }
                latency = time_interleaved(runners, image, args.repeats)
                for kind in models:
                    rows.append({
                        "scale": scale, "kind": kind, "quantization": mode,
                        "threads": threads, "bytes": sizes[kind],
                        "median_ms": latency[kind], "flops": flops[kind],
                        "accuracy": None,
                    })
                print(f"{scale} {mode:>8} {threads} thread(s): " + ", ".join(
                    f"{k} {latency[k]:.2f} ms" for k in models), flush=True)

    def find(scale, kind, mode, threads):
        for row in rows:
            if (row["scale"], row["kind"], row["quantization"],
                    row["threads"]) == (scale, kind, mode, threads):
                return row
        return None

    lines = [
        "# TFLite / LiteRT latency and size",
        "",
        f"Machine: {machine()}; 1-minute load average {load_before:.1f} at "
        f"the start and {os.getloadavg()[0]:.1f} at the end of the run (other "
        "jobs on the machine make absolute times and 2-thread runs noisy; the "
        "ratios compare models timed alternately). LiteRT interpreter with "
        "XNNPACK, one image "
        f"(224x224, patch 32), median of {args.repeats} calls, models "
        "alternated. Random weights (no trained preset is published yet, so "
        "no accuracy column); MoNE at its preset's capacity budget. Generated "
        "by `benchmarks/tflite_latency.py`.",
        "",
        "| scale | model | quantization | MB | MFLOPs | ms (1 thread) | "
        "ms (2 threads) | vs dense (1 thread) | int8 speed-up vs float32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for scale in args.scales:
        for kind in args.kinds:
            for mode in args.modes:
                one, two = find(scale, kind, mode, 1), find(scale, kind, mode, 2)
                dense = find(scale, "dense", mode, 1)
                ratio = one["median_ms"] / dense["median_ms"] if dense else None
                speedup = "-"
                if mode == "int8" and find(scale, kind, "none", 1):
                    speedup = (
                        f"{find(scale, kind, 'none', 1)['median_ms'] / one['median_ms']:.2f}x"
                    )
                lines.append(
                    f"| {scale} | {kind} | {mode} | {one['bytes'] / 1e6:.2f} | "
                    f"{one['flops'] / 1e6:.1f} | {one['median_ms']:.2f} | "
                    f"{two['median_ms']:.2f} | "
                    f"{ratio:.3f} | {speedup} |"
                )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tflite.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "tflite.json").write_text(json.dumps(
        {"machine": machine(), "repeats": args.repeats,
         "load_average": [load_before, os.getloadavg()[0]], "rows": rows},
        indent=2
    ) + "\n")
    print("\n".join(lines))
    print(f"wrote {RESULTS / 'tflite.md'}")


if __name__ == "__main__":
    main()
