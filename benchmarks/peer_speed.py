"""Forward speed against the peers: timm's ViT (PyTorch) and keras-hub's
`ViTBackbone` (JAX), same config, same process, interleaved.

Config of every model: 12 layers x 192 wide, 3 heads, MLP 768, patch 32,
224x224x3 images, class token, 100 classes (ViT-Ti/32; our `tiny`).
Ours: the dense `tiny` (tanh-GELU, as shipped), the dense `tiny` with
`mlp_activation="gelu"` (exact GELU, the function timm and keras-hub use;
same weights layout), Mobile V-MoE `tiny_e10` (10 experts, top-1, 2 MoE
layers) and MoNE `tiny_mone` (budget 0.5). Random weights; inference mode.

One process per backend comparison (the parent starts them with
KERAS_BACKEND set):
- torch: ours vs `timm.models.vision_transformer.VisionTransformer`, with
  its default erf GELU and with tanh-GELU (`act_layer="gelu_tanh"`, the
  activation of our presets): each of ours is compared with the timm ViT
  of the same activation. Eager under `torch.no_grad()` and, with
  `--compile`, both under `torch.compile`.
- jax: ours (`jax.jit` of `stateless_call`) vs keras-hub's `ViTBackbone` +
  a Dense head on the class token (`jax.jit` too).

Batch 1 and 64. Calls alternate between the models of a comparison so that
they share the machine's load; the medians and their ratios (ours / peer)
go to benchmarks/results/peer_speed.md and .json.

Goals (issue 17): torch eager, ours / timm <= 1.15 at batch 64 and <= 1.5
at batch 1; jax, ours / keras-hub <= 1.0. Judged on the dense `tiny` (the
like-for-like model); the MoE and MoNE ratios are reported alongside.

    python benchmarks/peer_speed.py [--compile] [--repeats-64 7]
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = dict(
    image_size=224,
    patch_size=32,
    num_layers=12,
    hidden_dim=192,
    num_heads=3,
    mlp_dim=768,
    num_classes=100,
)
GOALS = {
    ("torch", "eager", 64): 1.15,
    ("torch", "eager", 1): 1.5,
    ("jax", "jit", 64): 1.0,
    ("jax", "jit", 1): 1.0,
}


def ours():
    """Our four models, built from the presets (random weights)."""
    import keras_mobile_moe as kmm

    n = CONFIG["num_classes"]
    return {
        "dense tiny": kmm.MobileVMoE.from_preset(
            "tiny", load_weights=False, num_classes=n
        ),
        "dense tiny (exact gelu)": kmm.MobileVMoE.from_preset(
            "tiny", load_weights=False, num_classes=n, mlp_activation="gelu"
        ),
        "tiny_e10 (MoE)": kmm.MobileVMoE.from_preset(
            "tiny_e10", load_weights=False, num_classes=n
        ),
        "tiny_mone (MoNE, 0.5)": kmm.MoNE.from_preset(
            "tiny_mone", load_weights=False, num_classes=n
        ),
    }


def torch_forwards(compile_models):
    """name -> (forward(images_nhwc), peer or ours), for the torch run."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from timm_helpers import import_timm

    timm = import_timm()
    c = CONFIG

    def timm_vit(activation):
        return timm.models.vision_transformer.VisionTransformer(
            img_size=c["image_size"],
            patch_size=c["patch_size"],
            embed_dim=c["hidden_dim"],
            depth=c["num_layers"],
            num_heads=c["num_heads"],
            mlp_ratio=c["mlp_dim"] / c["hidden_dim"],
            num_classes=c["num_classes"],
            act_layer=activation,
        ).eval()

    def wrap(fn):
        if compile_models:
            fn = torch.compile(fn)

        def forward(images):
            with torch.no_grad():
                return fn(images)

        return forward

    # timm takes NCHW; the layout change is outside the timed call for it
    # and inside the model for us (ours take NHWC, as Keras does).
    forwards = {
        name: (wrap(lambda x, m=timm_vit(activation): m(x)), "nchw")
        for name, activation in (
            ("timm ViT", "gelu"),
            ("timm ViT (tanh gelu)", "gelu_tanh"),
        )
    }
    for name, model in ours().items():
        forwards[name] = (wrap(lambda x, m=model: m(x, training=False)), "nhwc")
    return forwards


def jax_forwards():
    import jax
    import keras
    import keras_hub

    c = CONFIG
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(c["image_size"], c["image_size"], 3),
        patch_size=c["patch_size"],
        num_layers=c["num_layers"],
        num_heads=c["num_heads"],
        hidden_dim=c["hidden_dim"],
        mlp_dim=c["mlp_dim"],
    )
    images = keras.Input(backbone.image_shape)
    tokens = backbone(images)
    logits = keras.layers.Dense(c["num_classes"])(tokens[:, 0])
    peer = keras.Model(images, logits)

    def jitted(model):
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        @jax.jit
        def forward(x):
            return model.stateless_call(trainable, non_trainable, x)[0]

        return lambda x: jax.block_until_ready(forward(x))

    forwards = {"keras-hub ViT": (jitted(peer), "nhwc")}
    for name, model in ours().items():
        forwards[name] = (jitted(model), "nhwc")
    return forwards


def run_backend(backend, compile_models, repeats, threads):
    """Runs inside the child process; returns the rows as dicts."""
    import numpy as np
    from common import median_ms

    default_peer = {"torch": "timm ViT", "jax": "keras-hub ViT"}[backend]
    mode = {"torch": "compiled" if compile_models else "eager", "jax": "jit"}[
        backend
    ]
    if backend == "torch":
        import torch

        torch.set_num_threads(threads)
        forwards = torch_forwards(compile_models)
        convert = {
            "nhwc": lambda x: torch.from_numpy(x),
            "nchw": lambda x: torch.from_numpy(
                np.ascontiguousarray(x.transpose(0, 3, 1, 2))
            ),
        }
    else:
        import jax.numpy as jnp

        forwards = jax_forwards()
        convert = {"nhwc": jnp.asarray}
    rows = []
    for batch in (1, 64):
        rng = np.random.default_rng(batch)
        size = CONFIG["image_size"]
        images = rng.uniform(-1, 1, (batch, size, size, 3)).astype("float32")
        inputs = {
            name: convert[layout](images)
            for name, (_, layout) in forwards.items()
        }
        warm = {}
        for name, (forward, _) in forwards.items():
            start = time.perf_counter()
            for _ in range(3):
                forward(inputs[name])
            warm[name] = time.perf_counter() - start
        times = {name: [] for name in forwards}
        for _ in range(repeats[batch]):
            for name, (forward, _) in forwards.items():
                start = time.perf_counter()
                forward(inputs[name])
                times[name].append(time.perf_counter() - start)
        default_ms = median_ms(times[default_peer])
        for name in forwards:
            ms = median_ms(times[name])
            peer = peer_of(backend, name)
            peer_ms = median_ms(times[peer])
            rows.append(
                {
                    "backend": backend,
                    "mode": mode,
                    "batch": batch,
                    "model": name,
                    "peer": peer,
                    "median_ms": round(ms, 3),
                    "peer_median_ms": round(peer_ms, 3),
                    "ratio": round(ms / peer_ms, 3),
                    "default_peer": default_peer,
                    "ratio_vs_default_peer": round(ms / default_ms, 3),
                    "warmup_s": round(warm[name], 2),
                    "repeats": repeats[batch],
                }
            )
            print(
                f"{backend} {mode} b{batch} {name}: {ms:.2f} ms "
                f"(x{ms / peer_ms:.2f} of {peer})",
                flush=True,
            )
    return rows


def peer_of(backend, name):
    """The peer a model is compared with: on torch, the timm ViT with the
    same GELU (our presets use tanh-GELU, whose PyTorch CPU kernel costs
    ~4x the erf GELU's: ~3 ms a block at batch 64 here); on jax, keras-hub's
    ViT (erf GELU only)."""
    if backend == "jax":
        return "keras-hub ViT"
    if name.startswith("timm"):
        return name
    return "timm ViT" if "exact gelu" in name else "timm ViT (tanh gelu)"


def load():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile on both torch sides",
    )
    parser.add_argument("--repeats-1", type=int, default=40)
    parser.add_argument("--repeats-64", type=int, default=7)
    parser.add_argument("--backends", default="torch,jax")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads for both sides (default 1: on the "
        "shared 2-core VM two spinning OpenMP threads stalled for hundreds "
        "of ms per call whenever another job held a core)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--child-compile", action="store_true", help=argparse.SUPPRESS
    )
    return parser.parse_args()


def run_children(args):
    """Runs every backend (and torch.compile) in its own process; their
    rows and the load averages before and after each."""
    runs = [(b, False) for b in args.backends.split(",")]
    if args.compile and "torch" in args.backends:
        runs.append(("torch", True))
    rows, loads = [], [load()]
    for backend, compiled in runs:
        command = [
            sys.executable,
            __file__,
            "--child",
            backend,
            "--repeats-1",
            str(args.repeats_1),
            "--repeats-64",
            str(args.repeats_64),
            "--torch-threads",
            str(args.torch_threads),
        ]
        if compiled:
            command.append("--child-compile")
        env = {**os.environ, "KERAS_BACKEND": backend}
        out = subprocess.run(
            command, env=env, capture_output=True, text=True, cwd=ROOT
        )
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("ROWS ")]
        if out.returncode or not lines:
            print(out.stdout[-3000:], out.stderr[-3000:])
            raise SystemExit(f"{backend} run failed ({out.returncode})")
        rows += json.loads(lines[-1][5:])
        loads.append(load())
    return rows, loads


def judge(rows):
    """Marks each dense row's goal (issue 17) and whether it was met."""
    for row in rows:
        goal = GOALS.get((row["backend"], row["mode"], row["batch"]))
        row["goal"] = goal if row["model"].startswith("dense tiny") else None
        if row["goal"] is not None and row["model"] != row["peer"]:
            row["goal_met"] = row["ratio"] <= goal


TABLE = [
    ("backend", lambda r: r["backend"]),
    ("mode", lambda r: r["mode"]),
    ("batch", lambda r: str(r["batch"])),
    ("model", lambda r: r["model"]),
    ("median ms", lambda r: f"{r['median_ms']:.2f}"),
    ("peer", lambda r: r["peer"]),
    ("x peer", lambda r: f"{r['ratio']:.2f}"),
    (
        "x timm / keras-hub default",
        lambda r: f"{r['ratio_vs_default_peer']:.2f}",
    ),
    (
        "goal",
        lambda r: (
            ""
            if r.get("goal") is None or r["model"] == r["peer"]
            else f"<= {r['goal']} " + ("met" if r["goal_met"] else "MISSED")
        ),
    ),
]


def report(rows, loads, args):
    from common import machine
    from common import markdown_table

    return (
        "# Forward speed against timm and keras-hub (issue 17)\n\n"
        f"Machine: {machine()}; load average (1/5/15 min) before and after "
        f"each backend's run: {' -> '.join(loads)}. The machine is shared "
        "with other jobs: absolute times are noisy, the ratios are paired "
        "(calls interleaved in one process). PyTorch ran with "
        f"{args.torch_threads} intra-op thread(s) on both sides.\n\n"
        "Config: ViT 12x192, 3 heads, MLP 768, patch 32, 224x224, 100 "
        "classes, random weights, inference. `x peer`: our median / the "
        "peer's median in the same run: on torch the timm ViT with the same "
        "GELU (`dense tiny`, the MoE and the MoNE use tanh-GELU as our "
        "presets do, `(exact gelu)` the erf GELU of timm's default), on jax "
        "keras-hub's ViT (erf GELU). The last column divides by timm's "
        "default (erf) ViT or keras-hub's. Goals are judged on the dense "
        "models against their peer.\n\n"
        + markdown_table(TABLE, rows)
        + "\n\nProduced by `python benchmarks/peer_speed.py"
        + (" --compile" if args.compile else "")
        + "`.\n"
    )


def main():
    args = parse_args()
    if args.child:
        sys.path.insert(0, HERE)
        repeats = {1: args.repeats_1, 64: args.repeats_64}
        rows = run_backend(
            args.child, args.child_compile, repeats, args.torch_threads
        )
        print("ROWS " + json.dumps(rows))
        return
    rows, loads = run_children(args)
    sys.path.insert(0, HERE)
    from common import write_results

    judge(rows)
    write_results(
        "peer_speed",
        report(rows, loads, args),
        {"config": CONFIG, "loads": loads, "rows": rows},
    )


if __name__ == "__main__":
    main()
