"""
# Deploying a Mobile V-MoE to a phone (TFLite / LiteRT)

**What you will learn:** how to export a trained Mobile V-MoE to a `.tflite`
file, shrink it with post-training quantization (float16, dynamic-range
int8, full int8), check that the exported model still agrees with Keras,
measure its latency with the LiteRT interpreter, and split it into a trunk
plus one file per expert so a phone keeps only one expert in memory.

## Background

Phones run models with LiteRT (formerly TensorFlow Lite): a compact
flatbuffer file and an interpreter with fast CPU kernels (XNNPACK).
`kmm.export.to_tflite(model, path, quantization=...)` converts any
`kmm.MobileVMoE` (or `kmm.MoNE`) built on any Keras backend: the conversion
itself runs on TensorFlow, in a subprocess when your backend is JAX or
PyTorch, because the weights are backend-neutral. By default
(`preprocessing=True`) the file takes what `model.predict` takes: one raw
RGB image, and does the model's resize and scaling itself with builtin ops,
so an app hands it camera pixels as they are. Its signature:

| tensor | name | dtype | shape (CIFAR-100 presets) |
|---|---|---|---|
| input | `images` | uint8, 0-255 | `[1, 32, 32, 3]` (`input_size`) |
| output | `logits` | float32 | `[1, 100]` |
| output | `router_logits` | float32 | `[1, 10]` |
| output | `expert_index` | int32 | `[1, 1]` (the chosen expert) |

The same description is stored in the file (`kmm.export.read_metadata`).
`preprocessing=False` writes a file that takes float32 images already
resized and scaled (for pipelines that preprocess themselves). Its routing
stays sparse: only the chosen expert's weights are read (`to_tflite` checks
this).

Quantization modes:

| mode | weights | activations | needs |
|---|---|---|---|
| `"none"` | float32 | float32 | - |
| `"float16"` | float16 | float32 | - |
| `"dynamic"` | int8 | float32 (int8 matmuls where possible) | - |
| `"int8"` | int8; float32 in the blocks before the router | float32 | - |
| `"int8"`, static | int8 | int8 | ~100 calibration images |

`"int8"` quantizes activations on the fly by default
(`int8_activations="dynamic"`: int8 matmuls where possible, no calibration
data); `int8_activations="static"` writes int8 activations too.

In `"int8"`, the layers that decide the routing stay in float32 by default
(`float_routing=True`): int8 rounding could otherwise send an image to a
different expert than Keras would. On the trained CIFAR-100 presets the
default agrees best with Keras and runs faster than float32 on an x86 CPU
(`benchmarks/results/tflite_quantization.md`); static int8 activations are
for accelerators that need them.

Run it with `KERAS_BACKEND=jax python guides/deploying_to_a_phone.py` (any
backend; TensorFlow and `ai-edge-litert` must be installed:
`pip install 'keras-mobile-moe[tflite]'`). It reads `KMM_GUIDE_PRESET`,
`KMM_CIFAR100_PATH`, `KMM_GUIDE_OUTPUT_DIR` and `KMM_GUIDE_SMOKE` (see
`guides/getting_started.py`); the `.tflite` files go to the output
directory. A few minutes on 2 CPU cores at the defaults.
"""

import json
import os
import time

import guide_helpers
import numpy as np

import keras_mobile_moe as kmm
from keras_mobile_moe.export import ExpertSplitRunner
from keras_mobile_moe.export import TFLiteClassifier

SMOKE = guide_helpers.smoke_mode()
PRESET = os.environ.get("KMM_GUIDE_PRESET", "6x64_e10.cifar100")
OUTPUT_DIR = guide_helpers.output_dir("kmm_deploy_")

"""
## The model and some images

Calibration images for int8 come from the training split; the parity and
accuracy checks use test images.
"""

model = kmm.MobileVMoE.from_preset(PRESET)
data, _ = guide_helpers.load_cifar100(SMOKE)
num_calibration = 20 if SMOKE else 100
num_check = 20 if SMOKE else 200
rng = np.random.default_rng(0)
calibration_raw = data["x_train"][
    rng.permutation(len(data["x_train"]))[:num_calibration]
]
check_pick = rng.permutation(len(data["y_test"]))[:num_check]
check_raw, check_labels = data["x_test"][check_pick], data["y_test"][check_pick]

"""
The files take the raw 32x32 uint8 CIFAR-100 images, like `model.predict`.
The reference is Keras's own decisions on the same raw images:
`keras_decisions` runs `predict`'s preprocessing and returns the logits
and the chosen experts.
"""

input_size = tuple(check_raw.shape[1:3])
print(f"file input: {check_raw.shape[1:]} {check_raw.dtype}")
reference = kmm.export.keras_decisions(
    model, check_raw, batch_size=50, preprocessing=True
)
reference_logits = reference["logits"]

"""
## Export in every quantization mode

`to_tflite` returns a report: the file size, the ops in the file (builtin
ops only: no Flex ops that a phone would not have) and how many stacked
expert tensors it found (each is only gathered, never multiplied in full).
"""

# The smoke run (tests) converts two modes only: each conversion from JAX or
# PyTorch starts TensorFlow in a subprocess.
modes = (
    ("none", "int8")
    if SMOKE
    else ("none", "float16", "dynamic", "int8", "int8_static")
)
options = {
    "int8_static": dict(
        quantization="int8",
        int8_activations="static",
        representative_data=calibration_raw,
    ),
}
reports = {}
for mode in modes:
    start = time.perf_counter()
    reports[mode] = kmm.export.to_tflite(
        model,
        os.path.join(OUTPUT_DIR, f"model_{mode}.tflite"),
        input_size=input_size,
        **options.get(mode, dict(quantization=mode)),
    )
    print(
        f"{mode:>11}: {reports[mode]['bytes'] / 1e6:6.2f} MB, "
        f"{len(reports[mode]['ops'])} op types, "
        f"{reports[mode]['stacked_expert_tensors']} stacked expert tensors, "
        f"converted in {time.perf_counter() - start:.0f} s"
    )

"""
## Parity with Keras

`TFLiteClassifier` wraps the `ai_edge_litert` interpreter; `.predict`
runs image by image (batch size 1, as on a phone). We compare with Keras:

- **top-1 agreement**: same predicted class;
- **routing agreement**: same expert;
- **max |logit difference|**.

float32 should match to about 1e-4; quantized files trade a little
agreement for size.
"""

rows = {}
for mode, report in reports.items():
    runner = TFLiteClassifier(report["path"], num_threads=1)
    outputs = runner.predict(check_raw)
    logits = outputs["logits"]
    rows[mode] = {
        "bytes": report["bytes"],
        "top1_agreement": float(
            np.mean(np.argmax(logits, -1) == np.argmax(reference_logits, -1))
        ),
        "routing_agreement": float(
            np.mean(outputs["expert_index"] == reference["expert_index"])
        ),
        "max_abs_logit_difference": float(
            np.max(np.abs(logits - reference_logits))
        ),
        "top1": float(np.mean(np.argmax(logits, -1) == check_labels)),
    }
keras_top1 = float(np.mean(np.argmax(reference_logits, -1) == check_labels))

"""
## Latency

We time one image at a time with one interpreter thread, alternating the
files so that they share the machine's noise, and report the median.
These are desktop-CPU numbers: they show the relative cost of the modes on
this machine, not phone timings (XNNPACK's int8 kernels shine on ARM phone
CPUs; on x86 its float32 kernels are often faster).
"""

repeats = 10 if SMOKE else 50
runners = {
    m: TFLiteClassifier(r["path"], num_threads=1) for m, r in reports.items()
}
image = check_raw[:1]
for runner in runners.values():
    for _ in range(3):
        runner(image)  # warm-up
times = {m: [] for m in runners}
for _ in range(repeats):
    for mode, runner in runners.items():
        start = time.perf_counter()
        runner(image)
        times[mode].append(time.perf_counter() - start)
for mode in rows:
    rows[mode]["median_ms"] = 1000 * float(np.median(times[mode]))

print(
    f"\nKeras top-1 on these {num_check} test images: {keras_top1:.3f}\n"
    f"{'mode':>11} {'MB':>6} {'ms':>7} {'top-1':>6} {'same class':>10} "
    f"{'same expert':>11} {'max |dlogit|':>12}"
)
for mode, r in rows.items():
    print(
        f"{mode:>11} {r['bytes'] / 1e6:6.2f} {r['median_ms']:7.2f} "
        f"{r['top1']:6.3f} {r['top1_agreement']:10.3f} "
        f"{r['routing_agreement']:11.3f} {r['max_abs_logit_difference']:12.4f}"
    )

"""
## Expert-split deployment

With one expert per image, a phone does not need all E experts in memory at
once. `kmm.export.to_tflite_expert_split` writes a *trunk* (patch embedding,
dense blocks, router) and one file per expert (the MoE blocks with that
expert's MLP, the final norm and the head). `ExpertSplitRunner` runs the
trunk, reads the chosen expert, loads that expert's file (keeping at most
one loaded) and runs it. The results equal the single file's; the memory
held at any time is the trunk plus one expert. These files take
preprocessed float32 images (the preprocessing is not folded into the
trunk), so we run the image converter first, on float pixels as `predict`
does.
"""

converter = model.preprocessor.image_converter
check_images = np.asarray(converter(check_raw.astype("float32")), "float32")

split_dir = os.path.join(OUTPUT_DIR, "expert_split")
manifest = kmm.export.to_tflite_expert_split(
    model, split_dir, quantization="none"
)
split = ExpertSplitRunner(split_dir)
single = TFLiteClassifier(reports["none"]["path"])
split_logits, split_experts = [], []
for x in check_images:
    out = split(x)
    split_logits.append(out["logits"])
    split_experts.append(out["expert"])
split_logits = np.concatenate(split_logits)
single_logits = single.predict(check_raw)["logits"]  # raw images, same pictures
split_difference = float(np.max(np.abs(split_logits - single_logits)))
largest_expert = max(e["bytes"] for e in manifest["experts"])
resident = manifest["trunk"]["bytes"] + largest_expert
whole = reports["none"]["bytes"]
print(
    f"\nexpert split: trunk {manifest['trunk']['bytes'] / 1e6:.2f} MB + "
    f"{len(manifest['experts'])} experts of <= {largest_expert / 1e6:.2f} MB; "
    f"resident {resident / 1e6:.2f} MB vs {whole / 1e6:.2f} MB for the single "
    f"file ({resident / whole:.0%}); max |logit difference| vs the single "
    f"file {split_difference:.2e}; experts used: "
    f"{np.bincount(split_experts, minlength=len(manifest['experts'])).tolist()}"
)

"""
Each image goes through the trunk, then only the chosen expert file. In an
app, images usually arrive one at a time; when consecutive images pick
different experts, loading the next expert file costs time, so keep recent
experts cached if memory allows.

## Summary

- `to_tflite` with `"float16"` halves the file at essentially no accuracy
  cost; `"dynamic"` and `"int8"` shrink it about 4x. Check top-1 and routing
  agreement on your own images before shipping a quantized file.
- Expert-split files hold about what the dense model holds in memory while
  keeping the MoE's accuracy.
- On a real phone, benchmark with the LiteRT benchmark tool or your app;
  `benchmarks/tflite_latency.py` compares dense, MoE and MoNE files here.
"""

results = {
    "preset": PRESET,
    "check_images": int(num_check),
    "keras_top1": keras_top1,
    "modes": rows,
    "expert_split": {
        "trunk_bytes": manifest["trunk"]["bytes"],
        "expert_bytes": [e["bytes"] for e in manifest["experts"]],
        "resident_bytes": resident,
        "single_file_bytes": whole,
        "max_abs_logit_difference_vs_single_file": split_difference,
    },
}
with open(os.path.join(OUTPUT_DIR, "deploying_to_a_phone.json"), "w") as f:
    json.dump(results, f, indent=2)
print(f"wrote {os.path.join(OUTPUT_DIR, 'deploying_to_a_phone.json')}")
