"""int8 recipes compared: the TFLite converter's PTQ vs ai-edge-quantizer.

For each shipped trained Mobile V-MoE preset, the float32 file (raw uint8
32x32 input, preprocessing inside) is quantized with

    conv_dynamic      converter, dynamic range (int8 weights, activations
                      quantized per call by the kernels)
    conv_int8         `to_tflite`'s int8 default: converter dynamic range,
                      then the blocks before the router given back their
                      float32 weights (int8_activations="dynamic")
    conv_int8_static  converter, full int8 with the routing path and the
                      residual stream in float32 (int8_activations="static",
                      the int8 default before)
    conv_int8_all     converter, static int8 everywhere it has a kernel
    aeq_w8a16         ai-edge-quantizer static_wi8_ai16 (int8 weights,
                      int16 activations), whole model
    aeq_w8a8_float_routing
                      ai-edge-quantizer static int8, the routing layers'
                      ops (`routing_layers(model)`, matched by tensor name)
                      left unquantized
    aeq_dynamic_float_routing
                      ai-edge-quantizer dynamic_wi8_afp32, routing layers
                      left unquantized

and compared with Keras on CIFAR-100 test images (a class-balanced shuffled
subset; `--num_test`): top-1 agreement, routing agreement (the file's int32
`expert_index` output), accuracy, file size, and LiteRT (XNNPACK) latency at
1 and 2 threads, every file timed alternately with the float32 file in the
same run (ratios are what carries over: the machine is shared). Calibration:
the first `--calibration` images of a shuffled training subset.

    KERAS_BACKEND=tensorflow python benchmarks/tflite_quantization.py \
        --data ../shared/datasets/cifar100.npz

Writes benchmarks/results/tflite_quantization.{md,json}.
"""

import argparse
import json
import os
import pathlib
import platform
import re
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import keras_mobile_moe as kmm  # noqa: E402
from keras_mobile_moe.export import keras_decisions  # noqa: E402
from keras_mobile_moe.export import routing_layers  # noqa: E402
from keras_mobile_moe.export import to_tflite  # noqa: E402
from keras_mobile_moe.export.tflite import _float_nodes  # noqa: E402
from keras_mobile_moe.export.tflite import load_interpreter  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
PRESETS = ("6x64_e10.cifar100", "12x64_e10.cifar100")


def load_data(path, num_test, num_calibration, seed=0):
    data = np.load(path, allow_pickle=False)
    rng = np.random.default_rng(seed)
    # The splits are grouped by class: shuffle before taking a subset.
    test = rng.permutation(len(data["y_test"]))[:num_test]
    train = rng.permutation(len(data["y_train"]))[:num_calibration]
    return (data["x_test"][test], data["y_test"][test], data["x_train"][train])


def aeq_file(float_bytes, recipe, calibration):
    from ai_edge_quantizer import quantizer

    q = quantizer.Quantizer(bytearray(float_bytes), recipe)
    result = None
    if q.need_calibration:
        result = q.calibrate(
            {"serving_default": [{"images": c[None]} for c in calibration]}
        )
    return bytes(
        q.quantize(result, enable_progress_report=False).quantized_model
    )


def routing_regex(model, float_bytes):
    nodes = _float_nodes(float_bytes, routing_layers(model))
    names = sorted({n for found in nodes.values() for n in found})
    return "|".join(re.escape(n) for n in names)


def aeq_recipes(model, float_bytes):
    from ai_edge_quantizer import recipe
    from ai_edge_quantizer import recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    scope = routing_regex(model, float_bytes)

    def with_float_routing(add):
        manager = recipe_manager.RecipeManager()
        add(manager)
        manager.add_quantization_config(
            regex=scope,
            operation_name="*",
            algorithm_key=AlgorithmName.NO_QUANTIZE,
        )
        return manager.get_quantization_recipe()

    return {
        "aeq_w8a16": recipe.static_wi8_ai16(),
        "aeq_w8a8_float_routing": with_float_routing(
            lambda m: m.add_static_config(
                regex=".*",
                operation_name="*",
                activation_num_bits=8,
                weight_num_bits=8,
            )
        ),
        "aeq_dynamic_float_routing": with_float_routing(
            lambda m: m.add_dynamic_config(
                regex=".*",
                operation_name="*",
                num_bits=8,
            )
        ),
    }


def run_file(path, images, threads=1):
    runner = load_interpreter(path, num_threads=threads).get_signature_runner()
    outputs = [runner(images=image[None]) for image in images]
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}


def time_interleaved(paths, image, repeats, threads):
    runners = {
        k: load_interpreter(p, num_threads=threads).get_signature_runner()
        for k, p in paths.items()
    }
    for runner in runners.values():
        for _ in range(5):
            runner(images=image)
    times = {k: [] for k in runners}
    for _ in range(repeats):
        for k, runner in runners.items():
            start = time.perf_counter()
            runner(images=image)
            times[k].append(time.perf_counter() - start)
    return {k: 1000 * float(np.median(v)) for k, v in times.items()}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        default=os.environ.get(
            "KMM_CIFAR100_PATH", "../shared/datasets/cifar100.npz"
        ),
    )
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--num_test", type=int, default=2000)
    parser.add_argument("--calibration", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument(
        "--render_only",
        action="store_true",
        help="Rewrite the Markdown from results/tflite_quantization.json.",
    )
    return parser.parse_args()


def converter_options(calibration):
    """The converter's variants: name -> `to_tflite` keyword arguments."""
    static = dict(
        quantization="int8",
        int8_activations="static",
        representative_data=calibration,
    )
    return {
        "float32": dict(quantization="none"),
        "conv_dynamic": dict(quantization="dynamic"),
        "conv_int8": dict(quantization="int8"),
        "conv_int8_static": static,
        "conv_int8_all": dict(
            static, float_routing=False, float_residual_stream=False
        ),
    }


def write_variants(model, preset, workdir, calibration):
    """Every variant's file: (name -> path, name -> seconds to make it)."""
    paths, seconds = {}, {}
    for name, kwargs in converter_options(calibration).items():
        start = time.perf_counter()
        paths[name] = to_tflite(
            model, workdir / f"{preset}_{name}.tflite", input_size=32, **kwargs
        )["path"]
        seconds[name] = time.perf_counter() - start
    float_bytes = pathlib.Path(paths["float32"]).read_bytes()
    for name, recipe in aeq_recipes(model, float_bytes).items():
        start = time.perf_counter()
        path = workdir / f"{preset}_{name}.tflite"
        path.write_bytes(aeq_file(float_bytes, recipe, calibration))
        paths[name] = str(path)
        seconds[name] = time.perf_counter() - start
    return paths, seconds


def agreement(got, want, test_y):
    """The file's outputs against Keras' decisions and the labels."""
    return {
        "top1_agreement": float(
            np.mean(got["logits"].argmax(-1) == want["logits"].argmax(-1))
        ),
        "routing_agreement": float(
            np.mean(
                np.all(
                    np.sort(got["expert_index"], -1)
                    == np.sort(want["expert_index"], -1),
                    -1,
                )
            )
        ),
        "accuracy": float(np.mean(got["logits"].argmax(-1) == test_y)),
        "max_abs_logit_error": float(
            np.abs(got["logits"] - want["logits"]).max()
        ),
    }


def builtin_only(path):
    ops = {
        op["op_name"]
        for op in load_interpreter(path, xnnpack=False)._get_ops_details()
    }
    return not any(o.startswith("Flex") or o == "CUSTOM" for o in ops)


def measure_preset(preset, test_x, test_y, calibration, workdir, repeats):
    """One row per variant of `preset`'s file."""
    model = kmm.MobileVMoE.from_preset(preset)
    want = keras_decisions(model, test_x, preprocessing=True)
    keras_accuracy = float(np.mean(want["logits"].argmax(-1) == test_y))
    paths, seconds = write_variants(model, preset, workdir, calibration)
    load_timing = os.getloadavg()[0]
    latency = {
        threads: time_interleaved(paths, test_x[:1], repeats, threads)
        for threads in (1, 2)
    }
    load_timing = [load_timing, os.getloadavg()[0]]
    rows = []
    for name, path in paths.items():
        row = {
            "preset": preset,
            "variant": name,
            "bytes": os.path.getsize(path),
            **agreement(run_file(path, test_x), want, test_y),
            "keras_accuracy": keras_accuracy,
            "ms_1_thread": latency[1][name],
            "ms_2_threads": latency[2][name],
            "speedup_vs_float32_1_thread": latency[1]["float32"]
            / latency[1][name],
            "speedup_vs_float32_2_threads": latency[2]["float32"]
            / latency[2][name],
            "builtin_only": builtin_only(path),
            "convert_s": seconds[name],
            "load_during_timing": load_timing,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main():
    args = parse_args()
    if args.render_only:
        write_reports(
            json.loads((RESULTS / "tflite_quantization.json").read_text())
        )
        return
    test_x, test_y, calibration = load_data(
        args.data, args.num_test, args.calibration
    )
    workdir = pathlib.Path(tempfile.mkdtemp())
    load_before = os.getloadavg()[0]
    rows = []
    for preset in args.presets:
        rows += measure_preset(
            preset, test_x, test_y, calibration, workdir, args.repeats
        )
    payload = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, "
        f"{platform.platform()}",
        "load_average": [load_before, os.getloadavg()[0]],
        "num_test": int(len(test_y)),
        "calibration": int(len(calibration)),
        "repeats": args.repeats,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tflite_quantization.json").write_text(
        json.dumps(payload, indent=1)
    )
    write_reports(payload)


START = "<!-- tflite_quantization.py: start -->"
END = "<!-- tflite_quantization.py: end -->"


def write_reports(payload):
    """tflite_quantization.md, and the same table as a section at the top
    of tflite.md (the latency table below it is tflite_latency.py's)."""
    table = render(payload)
    (RESULTS / "tflite_quantization.md").write_text(table)
    latency = RESULTS / "tflite.md"
    text = latency.read_text() if latency.exists() else ""
    if START in text:
        text = text[: text.index(START)] + text[text.index(END) + len(END) :]
    title, _, rest = text.partition("\n")
    section = f"{START}\n{table.replace('# int8', '## int8', 1)}{END}\n"
    latency.write_text(f"{title}\n\n{section}{rest}")
    print(table)


def render(payload):
    lines = [
        "# int8: TFLite converter PTQ vs ai-edge-quantizer",
        "",
        f"Machine: {payload['machine']}, shared with other jobs (1-minute "
        f"load {payload['load_average'][0]:.1f} at the start, "
        f"{payload['load_average'][1]:.1f} at the end). CIFAR-100 test: "
        f"{payload['num_test']} images (shuffled with seed 0, not the full "
        f"10,000); calibration: {payload['calibration']} shuffled training "
        "images. Every file takes raw uint8 32x32 images (preprocessing in "
        "the file). Agreement is with the Keras model on the same raw "
        "images; routing from the file's int32 `expert_index`. Latency: "
        "LiteRT with XNNPACK, one image, median of "
        f"{payload['repeats']} calls, all files of a preset alternated in "
        "one run; the speed-up is float32's median over the file's (same "
        "run). Generated by `benchmarks/tflite_quantization.py`.",
        "",
        "Variants: `float32`; `conv_dynamic`: converter dynamic range (int8 "
        "weights, activations quantized per call by the kernels); "
        "`conv_int8`: **`to_tflite`'s int8 default** (`int8_activations="
        '"dynamic"`): dynamic range, then the blocks before the router '
        "given back their float32 weights (they decide the routing; the "
        "patch embedding, the MoE blocks, the experts and the head stay "
        "int8); `conv_int8_static`: full int8 calibrated, routing path and "
        'residual stream float (`int8_activations="static"`, the default '
        "before); `conv_int8_all`: static int8 everywhere; `aeq_*`: "
        "ai-edge-quantizer recipes (see the script's docstring).",
        "",
    ]
    timing_load = {
        r["preset"]: r["load_during_timing"]
        for r in payload["rows"]
        if "load_during_timing" in r
    }
    if timing_load:
        lines += [
            "1-minute load average before / after the latency runs: "
            + "; ".join(
                f"{p} {a:.1f} / {b:.1f}" for p, (a, b) in timing_load.items()
            )
            + ".",
            "",
        ]
    cores = int(payload["machine"].split()[1])
    if max(payload["load_average"]) > 2 * cores:
        lines += [
            f"**Latency caveat:** the load average was above {2 * cores} "
            f"on {cores} cores for this run, so the interpreters waited for "
            "CPU much of the time, and the latencies and speed-ups below are "
            "not reliable. Agreement, accuracy and sizes do not depend on "
            "the load.",
            "",
        ]
    lines += [
        "| preset | variant | MB | top-1 agr. % | routing agr. % "
        "| test top-1 % (Keras) | max abs logit err | ms 1 thr | ms 2 thr "
        "| speed-up vs "
        "float32 (1 / 2 thr) | builtin only |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['preset']} | {r['variant']} | {r['bytes'] / 1e6:.2f} | "
            f"{100 * r['top1_agreement']:.1f} | "
            f"{100 * r['routing_agreement']:.1f} | "
            f"{100 * r['accuracy']:.2f} ({100 * r['keras_accuracy']:.2f}) | "
            f"{r['max_abs_logit_error']:.3g} | {r['ms_1_thread']:.2f} | "
            f"{r['ms_2_threads']:.2f} | "
            f"{r['speedup_vs_float32_1_thread']:.2f}x / "
            f"{r['speedup_vs_float32_2_threads']:.2f}x | "
            f"{'yes' if r['builtin_only'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
