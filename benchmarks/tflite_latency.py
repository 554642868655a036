"""TFLite/LiteRT size and single-image latency: dense ViT, Mobile V-MoE and
MoNE at equal scale, for every quantization mode, at 1 and 2 threads.

For each scale (default 6x64, 12x64, 12x192 at 224x224, patch 32), the dense
preset, its MoE twin (E=10, k=1) and its MoNE twin (budget of the preset) are
exported on the TensorFlow backend, checked for builtin ops only, and timed
with the `ai_edge_litert` interpreter (XNNPACK), alternating the models so
they share the machine's noise. Where a trained CIFAR-100 preset is
published (`{scale}_cifar100`, `{scale}_e10_cifar100`) its weights are used,
and the accuracy of every file and of the Keras model is measured on a
class-balanced cut of the CIFAR-100 test split (`--accuracy_images`, from
`$KMM_CIFAR100_PATH`), with the file's top-1 and routing agreement with
Keras (`kmm.export.agreement`); other models have random weights (latency
does not depend on them).

Writes benchmarks/results/tflite.md and tflite.json.

Usage:
    KMM_CIFAR100_PATH=../shared/datasets/cifar100.npz \
        python benchmarks/tflite_latency.py [--repeats 30]
"""

import argparse
import os
import pathlib
import sys
import tempfile

os.environ["KERAS_BACKEND"] = "tensorflow"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import machine  # noqa: E402
from common import median_ms  # noqa: E402
from common import time_interleaved  # noqa: E402
from common import write_results  # noqa: E402
from keras import ops as kmm_ops  # noqa: E402

import keras_mobile_moe as kmm  # noqa: E402
from keras_mobile_moe.export import TFLiteClassifier  # noqa: E402
from keras_mobile_moe.export import agreement  # noqa: E402
from keras_mobile_moe.export import to_tflite  # noqa: E402
from keras_mobile_moe.export.__main__ import calibration_images  # noqa: E402

MODES = ("none", "float16", "dynamic", "int8")


def build(kind, scale):
    """(model, trained preset name or None): trained weights where published."""
    cls = kmm.MoNE if kind == "mone" else kmm.MobileVMoE
    plain = {"dense": scale, "moe": f"{scale}_e10", "mone": f"{scale}_mone"}[
        kind
    ]
    trained = f"{plain}_cifar100"
    if trained in cls.presets:
        return cls.from_preset(trained), trained
    return cls.from_preset(plain, load_weights=False), None


def test_cut(per_class):
    """A class-balanced cut of CIFAR-100's test split (None without data)."""
    if not os.environ.get(kmm.datasets.cifar100.ENV_VAR):
        return None
    data = kmm.datasets.cifar100.load_data()
    labels = data["y_test"]
    pick = np.concatenate(
        [np.flatnonzero(labels == c)[:per_class] for c in range(100)]
    )
    return data["x_test"][pick], labels[pick]


def model_inputs(model, images):
    converted = model.preprocessor.image_converter(images)
    return np.asarray(kmm_ops.convert_to_numpy(converted), "float32")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--scales", nargs="+", default=["6x64", "12x64", "12x192"]
    )
    parser.add_argument("--kinds", nargs="+", default=["dense", "moe", "mone"])
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--calibration", type=int, default=100)
    parser.add_argument(
        "--accuracy_images",
        type=int,
        default=1000,
        help="Test images (a multiple of 100) for trained presets' accuracy.",
    )
    return parser.parse_args()


def export_all(models, scale, mode, calibration, workdir):
    """Every model of a scale as a .tflite file: (paths, sizes) by kind."""
    paths, sizes = {}, {}
    for kind, model in models.items():
        report = to_tflite(
            model,
            workdir / f"{scale}_{kind}_{mode}.tflite",
            quantization=mode,
            representative_data=calibration if mode == "int8" else None,
            # The model's own 224x224 float input: this table times the
            # network, not the in-file resize.
            preprocessing=False,
        )
        paths[kind], sizes[kind] = report["path"], report["bytes"]
    return paths, sizes


def measure_scale(scale, args, cut, workdir):
    """Rows of one scale: every kind, mode and thread count."""
    built = {kind: build(kind, scale) for kind in args.kinds}
    models = {kind: model for kind, (model, _) in built.items()}
    trained = {kind: name for kind, (_, name) in built.items()}
    test_inputs = {
        kind: model_inputs(model, cut[0])
        for kind, model in models.items()
        if trained[kind] and cut is not None
    }
    flops = {kind: kmm.count_flops(m) for kind, m in models.items()}
    calibration = calibration_images(models["dense"], args.calibration)
    image = calibration[:1]
    rows = []
    for mode in args.modes:
        paths, sizes = export_all(models, scale, mode, calibration, workdir)
        scores = {
            kind: agreement(models[kind], paths[kind], inputs, cut[1])
            for kind, inputs in test_inputs.items()
        }
        for threads in (1, 2):
            runners = {
                kind: TFLiteClassifier(path, num_threads=threads)
                for kind, path in paths.items()
            }
            times = time_interleaved(runners, image, args.repeats)
            latency = {kind: median_ms(t) for kind, t in times.items()}
            for kind in models:
                score = scores.get(kind, {})
                rows.append(
                    {
                        "scale": scale,
                        "kind": kind,
                        "quantization": mode,
                        "threads": threads,
                        "bytes": sizes[kind],
                        "median_ms": latency[kind],
                        "flops": flops[kind],
                        "preset": trained[kind],
                        "accuracy": score.get("tflite_accuracy"),
                        "keras_accuracy": score.get("keras_accuracy"),
                        "top1_agreement": score.get("top1"),
                        "routing_agreement": score.get("routing"),
                    }
                )
            print(
                f"{scale} {mode:>8} {threads} thread(s): "
                + ", ".join(f"{k} {latency[k]:.2f} ms" for k in models),
                flush=True,
            )
    return rows


def pct(value):
    return "–" if value is None else f"{100 * value:.1f}"


def table_rows(rows, args):
    """The report's lines: one per scale, kind and mode."""

    def find(scale, kind, mode, threads):
        for row in rows:
            if (
                row["scale"],
                row["kind"],
                row["quantization"],
                row["threads"],
            ) == (scale, kind, mode, threads):
                return row
        return None

    lines = []
    for scale in args.scales:
        for kind in args.kinds:
            for mode in args.modes:
                one, two = (
                    find(scale, kind, mode, 1),
                    find(scale, kind, mode, 2),
                )
                dense = find(scale, "dense", mode, 1)
                ratio = one["median_ms"] / dense["median_ms"] if dense else None
                speedup = "-"
                if mode == "int8" and find(scale, kind, "none", 1):
                    float_ms = find(scale, kind, "none", 1)["median_ms"]
                    speedup = f"{float_ms / one['median_ms']:.2f}x"
                accuracy = "–"
                if one["accuracy"] is not None:
                    accuracy = (
                        f"{pct(one['accuracy'])} ({pct(one['keras_accuracy'])})"
                    )
                agree = "–"
                if one["top1_agreement"] is not None:
                    agree = (
                        f"{pct(one['top1_agreement'])} / "
                        f"{pct(one['routing_agreement'])}"
                    )
                lines.append(
                    f"| {scale} | {kind} | {one['preset'] or 'random'} | "
                    f"{mode} | "
                    f"{one['bytes'] / 1e6:.2f} | "
                    f"{one['flops'] / 1e6:.1f} | {one['median_ms']:.2f} | "
                    f"{two['median_ms']:.2f} | "
                    f"{ratio:.3f} | {speedup} | {accuracy} | {agree} |"
                )
    return lines


def render(rows, args, cut, loads):
    lines = [
        "# TFLite / LiteRT latency and size",
        "",
        f"Machine: {machine()}; 1-minute load average {loads[0]:.1f} at "
        f"the start and {loads[1]:.1f} at the end of the run (other "
        "jobs on the machine make absolute times and 2-thread runs noisy; the "
        "ratios compare models timed alternately). LiteRT interpreter with "
        "XNNPACK, one image "
        f"(224x224, patch 32), median of {args.repeats} calls, models "
        "alternated. Models with a published CIFAR-100 preset use its "
        "weights, and their accuracy is measured on "
        + (
            f"{len(cut[1])} test images ({len(cut[1]) // 100} per class)"
            if cut is not None
            else "no data (KMM_CIFAR100_PATH unset)"
        )
        + " for the file and for the Keras model (in brackets), with the "
        "file's top-1 and routing agreement with Keras; the other models have "
        "random weights. MoNE at its preset's capacity budget. int8 is "
        "`kmm.export.to_tflite`'s default (int8 weights, activations "
        "quantized per call, the blocks before the router in float32). "
        "Generated by `benchmarks/tflite_latency.py`.",
        "",
        "| scale | model | weights | quantization | MB | MFLOPs | "
        "ms (1 thread) | ms (2 threads) | vs dense (1 thread) "
        "| int8 speed-up vs float32 "
        "| test top-1 % (Keras) | agreement top-1 / routing % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(lines + table_rows(rows, args))


def main():
    args = parse_args()
    cut = test_cut(max(1, args.accuracy_images // 100))
    load_before = os.getloadavg()[0]
    workdir = pathlib.Path(tempfile.mkdtemp())
    rows = [
        row
        for scale in args.scales
        for row in measure_scale(scale, args, cut, workdir)
    ]
    loads = [load_before, os.getloadavg()[0]]
    write_results(
        "tflite",
        render(rows, args, cut, loads),
        {"repeats": args.repeats, "load_average": loads, "rows": rows},
    )


if __name__ == "__main__":
    main()
