"""Latency of Mobile V-MoE over its dense twin at equal FLOPs.

For 12x192 and 6x64 (224x224, patch 32), the MoE (E=10, k=1, last 2 blocks)
and the dense ViT of the same scale are built in the same process, compiled
for the current backend (JAX jit, TF XLA, torch.compile), warmed up and timed
alternately; the table shows median latency and the MoE/dense ratio at batch
1 and 64. Because each image runs only its own expert, the ratio should be
close to 1 (computing all 10 experts would cost about 1.5-2x).

Usage:
    KERAS_BACKEND=jax python benchmarks/moe_overhead.py [--repeats 50]

Writes benchmarks/results/moe_overhead_<backend>.json.
"""

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import keras  # noqa: E402
from common import RESULTS  # noqa: E402
from common import compiled_forward  # noqa: E402
from common import convert_images  # noqa: E402
from common import goal_status  # noqa: E402
from common import machine  # noqa: E402
from common import markdown_table  # noqa: E402
from common import median_ms  # noqa: E402
from common import random_images  # noqa: E402
from common import time_interleaved  # noqa: E402
from common import write_json  # noqa: E402

import keras_mobile_moe as kmm  # noqa: E402

GOALS = {1: 1.10, 64: 1.15}  # JAX on a 2-core CPU (issue #2)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scales", nargs="+", default=["12x192", "6x64"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=None)
    return parser.parse_args()


def measure_scale(scale, batches, repeats):
    """One row per batch size: the MoE and its dense twin, timed
    alternately in this process."""
    dense = kmm.MobileVMoE.from_preset(scale, load_weights=False)
    moe = kmm.MobileVMoE.from_preset(f"{scale}_e10", load_weights=False)
    forwards = {"dense": compiled_forward(dense), "moe": compiled_forward(moe)}
    rows = []
    for batch in batches:
        images = convert_images(
            random_images(batch, dense.backbone.image_shape)
        )
        # Fewer repeats at large batch keep the run short; still >= 10.
        batch_repeats = max(10, repeats // (1 + batch // 16))
        times = time_interleaved(forwards, images, batch_repeats)
        row = {
            "scale": scale,
            "batch": batch,
            "repeats": batch_repeats,
            "dense_ms": median_ms(times["dense"]),
            "moe_ms": median_ms(times["moe"]),
            "dense_flops": kmm.count_flops(dense),
            "moe_flops": kmm.count_flops(moe),
        }
        row["ratio"] = row["moe_ms"] / row["dense_ms"]
        row["goal"] = GOALS.get(batch)
        rows.append(row)
        print(
            f"{scale:>7} batch {batch:>3}: dense {row['dense_ms']:8.2f} ms"
            f"  moe {row['moe_ms']:8.2f} ms  ratio {row['ratio']:.3f}",
            flush=True,
        )
    return rows


TABLE = [
    ("scale", lambda r: r["scale"]),
    ("batch", lambda r: str(r["batch"])),
    ("dense ms", lambda r: f"{r['dense_ms']:.2f}"),
    ("MoE ms", lambda r: f"{r['moe_ms']:.2f}"),
    ("MoE/dense", lambda r: f"{r['ratio']:.3f}"),
    ("goal (JAX)", lambda r: f"<= {r['goal']:.2f}" if r["goal"] else "-"),
]


def main():
    args = parse_args()
    backend = keras.config.backend()
    rows = [
        row
        for scale in args.scales
        for row in measure_scale(scale, args.batches, args.repeats)
    ]
    print(f"\nMoE / dense latency, backend {backend}, {machine()}")
    print(markdown_table(TABLE, rows))
    write_json(
        args.out or os.path.join(RESULTS, f"moe_overhead_{backend}.json"),
        {"rows": rows},
    )
    return goal_status(rows, lambda row: row["ratio"] > row["goal"])


if __name__ == "__main__":
    sys.exit(main())
