"""Agreement of quantized TFLite files with their Keras model on CIFAR-100.

For each model (a preset name, a preset directory, `hf://...` or a saved
`.keras` file), every variant is exported with `kmm.export.to_tflite` on the
TensorFlow backend and run with the `ai_edge_litert` interpreter on the
committed CIFAR-100 fixture (1000 images by default). Reported per variant:
top-1 agreement with Keras (same class), routing agreement (same chosen
experts, read from the file's int32 `expert_index` output), file size vs
float32, and, because the fixture has labels, both accuracies. int8 files
calibrate on the first `--calibration` images of the fixture's training
split.

Variants:
    float32      quantization="none"
    float16      quantization="float16"
    dynamic      quantization="dynamic" (int8 weights, float activations)
    int8         quantization="int8" with to_tflite's defaults: the routing
                 path and the residual stream (block additions, LayerNorms,
                 head) in float32; attention, MLPs and experts int8
    int8_routing int8 with only the routing path in float32
                 (float_residual_stream=False)
    int8_stream  int8 with only the residual stream in float32
                 (float_routing=False)
    int8_full    int8 everywhere an int8 kernel exists (float_routing=False,
                 float_residual_stream=False)

Writes <out>.md and <out>.json (default benchmarks/results/tflite_agreement).

Usage:
    python benchmarks/tflite_agreement.py --model 6x64_e10_cifar100
    python benchmarks/tflite_agreement.py --model path/to/preset_dir \\
        --model tests/data/tiny_moe_cifar100.keras --out /tmp/agreement
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

import keras  # noqa: E402
import numpy as np  # noqa: E402
from common import machine  # noqa: E402
from common import write_results  # noqa: E402

import keras_mobile_moe as kmm  # noqa: E402
from keras_mobile_moe.export import agreement  # noqa: E402
from keras_mobile_moe.export import fixture_images  # noqa: E402
from keras_mobile_moe.export import to_tflite  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
VARIANTS = {
    "float32": dict(quantization="none"),
    "float16": dict(quantization="float16"),
    "dynamic": dict(quantization="dynamic"),
    "int8": dict(quantization="int8"),
    "int8_routing": dict(quantization="int8", float_residual_stream=False),
    "int8_stream": dict(quantization="int8", float_routing=False),
    "int8_full": dict(
        quantization="int8", float_routing=False, float_residual_stream=False
    ),
}


def load_model(spec, random_weights=False):
    """A classifier from a `.keras` file, a preset name, directory or hf://."""
    if spec.endswith(".keras"):
        if not pathlib.Path(spec).is_file():
            raise ValueError(
                f"Received: --model {spec!r}, a .keras path that does not "
                "exist. Accepted: a saved .keras file, a preset name, a "
                "preset directory or hf://org/repo."
            )
        return keras.saving.load_model(spec, compile=False)
    try:
        return kmm.MobileVMoE.from_preset(spec, load_weights=not random_weights)
    except ValueError as error:
        if "MoNE" not in str(error):
            raise
        return kmm.MoNE.from_preset(spec, load_weights=not random_weights)


def measure(model, name, variants, calibration, sets, split, threads, workdir):
    images, labels = fixture_images(model, split)
    train, _ = fixture_images(model, "train")
    if sets * calibration > len(train):
        raise ValueError(
            f"Received: --calibration {calibration} --calibration_sets {sets}"
            f"; the fixture has {len(train)} training images. Accepted: "
            "calibration * calibration_sets <= 800."
        )
    rows = []
    float32_bytes = None
    for variant in ["float32"] + [v for v in variants if v != "float32"]:
        options = dict(VARIANTS[variant])
        int8 = options["quantization"] == "int8"
        results, start = [], time.perf_counter()
        # int8 depends on the calibration images: disjoint sets of
        # `calibration` fixture training images, the first set first.
        for k in range(sets if int8 else 1):
            if int8:
                options["representative_data"] = train[
                    k * calibration : (k + 1) * calibration
                ]
            report = to_tflite(
                model, workdir / f"{variant}_{k}.tflite", **options
            )
            if variant == "float32":
                float32_bytes = report["bytes"]
                if "float32" not in variants:
                    break
            results.append(
                agreement(
                    model, report["path"], images, labels, num_threads=threads
                )
            )
        if not results:
            continue
        first = results[0]

        def spread(key):
            values = [r[key] for r in results]
            if values[0] is None:
                return None, None, None
            return float(np.mean(values)), min(values), max(values)

        top1, top1_min, top1_max = spread("top1")
        routing, routing_min, routing_max = spread("routing")
        row = {
            "model": name,
            "variant": variant,
            "top1": top1,
            "top1_min": top1_min,
            "top1_max": top1_max,
            "routing": routing,
            "routing_min": routing_min,
            "routing_max": routing_max,
            "top1_first_set": first["top1"],
            "routing_first_set": first["routing"],
            "bytes": report["bytes"],
            "size_vs_float32": report["bytes"] / float32_bytes,
            "keras_accuracy": first["keras_accuracy"],
            "tflite_accuracy": spread("tflite_accuracy")[0],
            "max_abs_logit_error": max(
                r["max_abs_logit_error"] for r in results
            ),
            "keras_margin_median": first["keras_margin_median"],
            "float_layers": report["float_layers"],
            "float_residual_stream": report["float_residual_stream"],
            "num_images": first["num_images"],
            "calibration_images": calibration if int8 else 0,
            "calibration_sets": len(results) if int8 else 0,
            "seconds": round(time.perf_counter() - start, 1),
        }
        rows.append(row)
        routing = "-" if routing is None else f"{routing:.1%}"
        print(
            f"{name} {variant:>12}: top-1 {top1:.1%} (min {top1_min:.1%}), "
            f"routing {routing}, size {row['size_vs_float32']:.2f}x float32",
            flush=True,
        )
    return rows


def table(rows):
    def pct(row, key):
        if row[key] is None:
            return "-"
        if row["calibration_sets"] > 1:
            return (
                f"{row[key]:.1%} ({row[key + '_min']:.1%}-"
                f"{row[key + '_max']:.1%})"
            )
        return f"{row[key]:.1%}"

    lines = [
        "| model | variant | top-1 agreement | routing agreement | size vs "
        "float32 | KB | Keras acc. | TFLite acc. | Keras median top-1 margin |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {pct(r, 'top1')} | "
            f"{pct(r, 'routing')} | {r['size_vs_float32']:.2f} | "
            f"{r['bytes'] / 1e3:.0f} | {r['keras_accuracy']:.1%} | "
            f"{r['tflite_accuracy']:.1%} | {r['keras_margin_median']:.2f} |"
        )
    return lines


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        help="Preset name, preset directory, hf://org/repo or .keras file "
        "(repeatable).",
    )
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS)
    )
    parser.add_argument(
        "--calibration",
        type=int,
        default=100,
        help="Fixture training images per calibration set.",
    )
    parser.add_argument(
        "--calibration_sets",
        type=int,
        default=1,
        help="int8: repeat with this many disjoint calibration sets and "
        "report the mean (min-max).",
    )
    parser.add_argument(
        "--split",
        default="all",
        choices=["all", "test", "train"],
        help="Fixture images to compare on (all = 800 train + 200 test).",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--random_weights",
        action="store_true",
        help="Presets without published weights: architecture only.",
    )
    parser.add_argument(
        "--out",
        default=str(RESULTS / "tflite_agreement"),
        help="Output path without extension (.md and .json are written).",
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="Keep the rows of <out>.json for other models and add these.",
    )
    args = parser.parse_args()
    if args.calibration < 1:
        parser.error(f"--calibration {args.calibration}: expected >= 1.")
    if args.calibration_sets < 1:
        parser.error(
            f"--calibration_sets {args.calibration_sets}: expected >= 1."
        )

    return args


def measure_models(args):
    """The rows of every --model, each file written in a temporary folder."""
    rows = []
    for spec in args.model:
        model = load_model(spec, args.random_weights)
        with tempfile.TemporaryDirectory() as workdir:
            rows += measure(
                model,
                spec,
                args.variants,
                args.calibration,
                args.calibration_sets,
                args.split,
                args.threads,
                pathlib.Path(workdir),
            )
    command = "benchmarks/tflite_agreement.py " + " ".join(sys.argv[1:])
    for row in rows:
        row.update(
            split=args.split,
            threads=args.threads,
            machine=machine(),
            command=command,
        )
    return rows


def with_previous(rows, out, models):
    """--append: the rows of `out`.json for other models, then `rows`."""
    path = out.with_suffix(".json")
    if not path.exists():
        return rows
    previous = json.loads(path.read_text())["rows"]
    return [r for r in previous if r["model"] not in set(models)] + rows


def report(rows):
    lines = [
        "# TFLite agreement with Keras (CIFAR-100 fixture)",
        "",
        "`ai_edge_litert` interpreter (XNNPACK). Top-1 agreement: same class "
        "as Keras; routing agreement: same chosen expert(s), read from the "
        "file's int32 `expert_index` output (not from re-quantized router "
        "logits). int8 variants are calibrated on disjoint sets of fixture "
        "training images; with several sets the table shows the mean "
        "(min-max) over the sets. The `all` split (1000 images) includes the "
        "calibration images. Size: bytes of the file / bytes of the float32 "
        "file. Generated by `benchmarks/tflite_agreement.py`; the runs:",
        "",
    ]
    for run in dict.fromkeys(
        (r["command"], r["machine"], r["split"], r["num_images"]) for r in rows
    ):
        lines.append(
            f"- `{run[0]}` on {run[1]}: split `{run[2]}` ({run[3]} images)"
        )
    return "\n".join(lines + ["", *table(rows)])


def main():
    args = parse_args()
    rows = measure_models(args)
    out = pathlib.Path(args.out)
    if args.append:
        rows = with_previous(rows, out, args.model)
    write_results(
        out.with_suffix("").name,
        report(rows),
        {"keras": keras.__version__, "rows": rows},
        out.parent,
    )


if __name__ == "__main__":
    main()
