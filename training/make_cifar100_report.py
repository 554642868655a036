"""Builds the CIFAR-100 reproduction report from the per-run results.

Reads `benchmarks/results/cifar100/*.json` (the `results.json` files written
by `training/train.py`, one per run, copied there) and writes
`benchmarks/results/cifar100.md` (dense vs Mobile V-MoE per scale, then every
run) and `benchmarks/results/cifar100.png` (test top-1 against FLOPs, dense
and MoE lines, like Fig. 1 of Daxberger et al., "Mobile V-MoEs", arXiv
2309.04354). MoNE runs (their `budget_curve`: test top-1 at capacity budgets
0.2 ... 1.0) get an accuracy-vs-budget table next to their dense twin (same
scale, input, epochs; the same seed when there is one) and
`benchmarks/results/cifar100_mone.png`.

Usage:
  python training/make_cifar100_report.py [--results_dir ...] [--out ...]
"""

import glob
import json
import os

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = flags.DEFINE_string(
    "results_dir",
    os.path.join(ROOT, "benchmarks", "results", "cifar100"),
    "Input.",
)
OUT = flags.DEFINE_string(
    "out",
    os.path.join(ROOT, "benchmarks", "results", "cifar100"),
    "Output path without extension (.md and .png are written).",
)


def load_runs(directory):
    runs = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
        run["name"] = os.path.splitext(os.path.basename(path))[0]
        arch = run["arch"]
        run["scale"] = f"{arch['num_layers']}x{arch['hidden_dim']}"
        # Runs before MoNE training recorded no family: all Mobile V-MoE.
        run["family"] = arch.get("family", "mobile_vmoe")
        routing = run["training"].get("routing", {}) or {}
        run["routing_mode"] = routing.get("mode")
        run["superclasses"] = routing.get("superclasses")
        run["experts"] = arch.get("num_experts") if arch.get("is_moe") else 0
        speeds = [
            float(row["train_images_per_second"])
            for row in run.get("history", [])
            if row.get("train_images_per_second")
        ]
        run["images_per_second"] = max(speeds) if speeds else None
        # Training time over every epoch, also those before a resume.
        seconds = [
            float(row["epoch_seconds"])
            for row in run.get("history", [])
            if row.get("epoch_seconds")
        ]
        run["train_seconds"] = sum(seconds) if seconds else run["wall_seconds"]
        runs.append(run)
    return runs


def is_main_moe(run):
    """The paper's MoE: E=10, super-classes discovered from the dense model."""
    return (
        run["arch"].get("is_moe")
        and run["experts"] == 10
        and run["routing_mode"] == "superclass"
        and run["superclasses"] not in (None, "coarse")
    )


def pct(value):
    return "–" if value is None else f"{100 * value:.2f}"


def pairs(runs):
    """[((scale, epochs, seed), {"dense": run, "moe": run})], sorted."""
    table = {}
    for run in runs:
        if run["family"] != "mobile_vmoe":
            continue
        key = (run["scale"], run["epochs"], run["training"]["seed"])
        if not run["arch"].get("is_moe"):
            table.setdefault(key, {})["dense"] = run
        elif is_main_moe(run):
            table.setdefault(key, {})["moe"] = run

    def order(key):
        layers, width = key[0].split("x")
        return int(width), int(layers), key[1], key[2]

    return [(k, table[k]) for k in sorted(table, key=order)]


def mean_by_scale(runs, kind, epochs):
    """[(MFLOPs, mean test top-1 %, scale, n)] over seeds, by FLOPs."""
    values = {}
    for (scale, run_epochs, _), pair in pairs(runs):
        if kind in pair and run_epochs == epochs:
            values.setdefault(scale, []).append(pair[kind])
    return sorted(
        (
            rs[0]["flops"] / 1e6,
            100 * sum(r["test_top1"] for r in rs) / len(rs),
            scale,
            len(rs),
        )
        for scale, rs in values.items()
    )


def inputs(runs):
    return ", ".join(
        sorted(
            {
                f"{r['arch']['image_shape'][0]}x{r['arch']['image_shape'][1]} "
                f"patch {r['arch']['patch_size']}"
                for r in runs
            }
        )
    )


def markdown(runs):
    lines = [
        "# CIFAR-100: dense ViT vs Mobile V-MoE",
        "",
        'Daxberger et al., "Mobile V-MoEs", arXiv 2309.04354 (Fig. 1 / '
        "Table 2 setting): CIFAR-100 images resized to the model input "
        f"({inputs(runs)}); "
        "MoE = E=10 experts, k=1, last 2 blocks, super-classes discovered "
        "from the dense model's validation confusion matrix "
        "(`training/discover_superclasses.py`). Dense and MoE of a scale use "
        "the same recipe, epochs and seed. Trained with `training/train.py`; "
        "test top-1 on the 10,000 test images, the stratified 10% of the "
        "training set held out for validation. Regenerate with "
        "`python training/make_cifar100_report.py`.",
        "",
        "| scale | seed | MFLOPs dense / MoE | params dense / MoE "
        "| activated params MoE | dense top-1 % | MoE top-1 % | delta (pp) "
        "| val delta (pp) | MoE router acc. % | epochs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (scale, _, seed), pair in pairs(runs):
        dense, moe = pair.get("dense"), pair.get("moe")
        flops = " / ".join(
            "–" if r is None else f"{r['flops'] / 1e6:.2f}"
            for r in (dense, moe)
        )
        params = " / ".join(
            "–" if r is None else f"{r['params'] / 1e6:.2f}M"
            for r in (dense, moe)
        )
        active = "–" if moe is None else f"{moe['activated_params'] / 1e6:.2f}M"
        delta = "–"
        val_delta = "–"
        if dense and moe:
            delta = f"{100 * (moe['test_top1'] - dense['test_top1']):+.2f}"
            if (
                dense.get("val_top1") is not None
                and moe.get("val_top1") is not None
            ):
                val_delta = (
                    f"{100 * (moe['val_top1'] - dense['val_top1']):+.2f}"
                )
        epochs = " / ".join(
            "–" if r is None else str(r["epochs"]) for r in (dense, moe)
        )
        lines.append(
            f"| {scale} | {seed} | {flops} | {params} | {active} | "
            f"{pct(dense and dense['test_top1'])} | "
            f"{pct(moe and moe['test_top1'])} | {delta} | {val_delta} | "
            f"{pct(moe and moe['test_router_accuracy'])} | {epochs} |"
        )
    lines += [
        "",
        "## Every run",
        "",
        "| run | preset | routing | E | epochs | val top-1 % | test top-1 % "
        "| test router acc. % | train images/s (best epoch) | training time "
        "| backend |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        routing = run["routing_mode"] or (
            "MoNE" if run["family"] == "mone" else "dense"
        )
        if run["superclasses"]:
            source = run["superclasses"]
            if source == "coarse":
                routing += " (CIFAR-100 coarse)"
            else:
                groups = os.path.splitext(os.path.basename(source))[0]
                routing += f" (discovered: {groups})"
        speed = run["images_per_second"]
        lines.append(
            f"| {run['name']} | {run['preset']} | {routing} | "
            f"{run['experts']} | {run['epochs']} | {pct(run['val_top1'])} | "
            f"{pct(run['test_top1'])} | "
            f"{pct(run['test_router_accuracy'])} | "
            f"{'–' if speed is None else f'{speed:.0f}'} | "
            f"{run['train_seconds'] / 60:.1f} min | "
            f"{run['training']['backend']} |"
        )
    lines += mone_section(runs)
    notes = os.path.join(RESULTS_DIR.value, "NOTES.md")
    if os.path.isfile(notes):
        with open(notes, encoding="utf-8") as f:
            lines += ["", f.read().strip()]
    lines += superclass_section(os.path.join(RESULTS_DIR.value, "superclasses"))
    machines = sorted(
        {run["machine"] for run in runs}
        | {
            run["test_evaluation"]["machine"]
            for run in runs
            if "test_evaluation" in run
        }
    )
    lines += [
        "",
        "Machine: " + "; ".join(machines) + ". Throughput is per run on a "
        "shared machine (other jobs ran at the same time); compare it only "
        "within a row.",
        "",
        "Commands: the `training.command` field of each JSON in "
        "`benchmarks/results/cifar100/`.",
        "",
    ]
    return "\n".join(lines)


def input_of(run):
    arch = run["arch"]
    return tuple(arch["image_shape"]), arch["patch_size"]


def dense_twin(run, runs):
    """The dense Mobile V-MoE-family run of a MoNE run's scale, input and
    epochs: the same seed if there is one, else the lowest seed."""
    twins = [
        r
        for r in runs
        if r["family"] == "mobile_vmoe"
        and not r["arch"].get("is_moe")
        and r["scale"] == run["scale"]
        and r["epochs"] == run["epochs"]
        and input_of(r) == input_of(run)
    ]
    if not twins:
        return None
    seed = run["training"]["seed"]
    return min(
        twins,
        key=lambda r: (r["training"]["seed"] != seed, r["training"]["seed"]),
    )


def mone_runs(runs):
    return [r for r in runs if r["family"] == "mone" and r.get("budget_curve")]


def mone_section(runs):
    """Accuracy against capacity budget of every MoNE run, next to its
    dense twin."""
    found = mone_runs(runs)
    if not found:
        return []
    lines = [
        "",
        "## MoNE: accuracy against compute budget",
        "",
        'Jain et al., "Mixture of Nested Experts", NeurIPS 2024: one '
        "MoNE model evaluated at capacity budgets e_c = 0.2 ... 1.0 (the "
        "same weights; `model.capacity_budget = e_c`). `adaptive`: trained "
        "with a budget drawn per step from 0.15 ... 0.95. Dense twin: the "
        "dense ViT of the same scale, input and epochs.",
    ]
    for run in found:
        twin = dense_twin(run, runs)
        budgets = run["arch"].get("training_budgets") or (
            f"fixed {run['arch'].get('capacity_budget')}"
        )
        lines += [
            "",
            f"### {run['name']}: {run['scale']}, trained with budgets "
            f"{budgets}, {run['epochs']} epochs, seed {run['training']['seed']}"
            + (
                ""
                if twin is None
                else f"; dense twin {twin['name']} ({pct(twin['test_top1'])}%, "
                f"{twin['flops'] / 1e6:.2f} MFLOPs)"
            ),
            "",
            "| budget | MoNE test top-1 % | MoNE MFLOPs | FLOPs vs dense "
            "| delta vs dense (pp) |",
            "|---|---|---|---|---|",
        ]
        for point in run["budget_curve"]:
            ratio = delta = "–"
            if twin is not None:
                ratio = f"{point['flops'] / twin['flops']:.2f}"
                delta = f"{100 * (point['test_top1'] - twin['test_top1']):+.2f}"
            lines.append(
                f"| {point['capacity_budget']:.1f} | {pct(point['test_top1'])} "
                f"| {point['flops'] / 1e6:.2f} | {ratio} | {delta} |"
            )
    return lines


def plot_mone(runs, path):
    """Test top-1 against MFLOPs: each MoNE run's budget curve and its dense
    twin's point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for run in mone_runs(runs):
        curve = run["budget_curve"]
        (line,) = ax.plot(
            [p["flops"] / 1e6 for p in curve],
            [100 * p["test_top1"] for p in curve],
            "o-",
            label=f"MoNE {run['scale']} ({run['name']})",
        )
        for p in curve:
            ax.annotate(
                f"{p['capacity_budget']:.1f}",
                (p["flops"] / 1e6, 100 * p["test_top1"]),
                textcoords="offset points",
                xytext=(3, -9),
                fontsize=6,
                color=line.get_color(),
            )
        twin = dense_twin(run, runs)
        if twin is not None:
            ax.plot(
                twin["flops"] / 1e6,
                100 * twin["test_top1"],
                "*",
                markersize=11,
                color=line.get_color(),
                label=f"dense {twin['scale']} ({twin['name']})",
            )
    ax.set_xlabel("MFLOPs per image (labels: capacity budget)")
    ax.set_ylabel("CIFAR-100 test top-1 (%)")
    ax.set_title("MoNE: accuracy against compute budget", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def superclass_section(directory):
    """Discovered groups (cf. the paper's Table 1) from discovery JSONs."""
    paths = sorted(glob.glob(os.path.join(directory, "*.json")))
    if not paths:
        return []
    lines = [
        "",
        "## Discovered super-classes",
        "",
        "`training/discover_superclasses.py`: confusion matrix of the dense "
        "model on the held-out validation split, spectral clustering into "
        "E=10 balanced groups (`kmm.superclasses_from_confusion`); adjusted "
        "Rand index (ARI) and purity against CIFAR-100's 20 coarse classes.",
    ]
    for path in paths:
        with open(path, encoding="utf-8") as f:
            found = json.load(f)
        name = os.path.splitext(os.path.basename(path))[0]
        lines += [
            "",
            f"### {name}: from a dense model with validation top-1 "
            f"{100 * found['val_top1']:.1f}%; "
            f"ARI {found['adjusted_rand_index_vs_coarse']:.3f}, "
            f"purity {found['purity_vs_coarse']:.3f}",
            "",
            "| expert | classes |",
            "|---|---|",
        ]
        for i, group in enumerate(found["groups"]):
            lines.append(f"| {i} | {', '.join(group)} |")
    return lines


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    all_epochs = sorted({r["epochs"] for r in runs})
    for epochs, (kind, label, style) in [
        (e, k)
        for e in all_epochs
        for k in (
            ("dense", "dense ViT", "o-"),
            ("moe", "Mobile V-MoE (E=10, k=1)", "s-"),
        )
    ]:
        points = mean_by_scale(runs, kind, epochs)
        if not points:
            continue
        if len(all_epochs) > 1:
            label = f"{label}, {epochs} epoch{'s' if epochs > 1 else ''}"
            if epochs != all_epochs[0]:
                style = style.replace("-", "--")
        (line,) = ax.plot(
            [p[0] for p in points], [p[1] for p in points], style, label=label
        )
        singles = [
            (pair[kind]["flops"] / 1e6, 100 * pair[kind]["test_top1"])
            for (_, run_epochs, _), pair in pairs(runs)
            if kind in pair and run_epochs == epochs
        ]
        ax.plot(
            [p[0] for p in singles],
            [p[1] for p in singles],
            ".",
            color=line.get_color(),
            alpha=0.5,
        )
        for x, y, scale, n in points:
            text = scale if n == 1 else f"{scale} (mean of {n})"
            ax.annotate(
                text,
                (x, y),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    others = [r for r in runs if r["arch"].get("is_moe") and not is_main_moe(r)]
    for run in others:
        ax.plot(run["flops"] / 1e6, 100 * run["test_top1"], "^", color="gray")
        ax.annotate(
            run["name"],
            (run["flops"] / 1e6, 100 * run["test_top1"]),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize=7,
            color="gray",
        )
    epochs = all_epochs
    ax.set_xscale("log")
    ax.set_xlabel(f"MFLOPs per image ({inputs(runs)})")
    ax.set_ylabel("CIFAR-100 test top-1 (%)")
    ax.set_title(
        "CIFAR-100, " + "/".join(map(str, epochs)) + " epoch(s)", fontsize=10
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv):
    del argv
    runs = load_runs(RESULTS_DIR.value)
    if not runs:
        raise SystemExit(f"No results in {RESULTS_DIR.value}/*.json.")
    with open(OUT.value + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(runs))
    plot(runs, OUT.value + ".png")
    written = [OUT.value + ".md", OUT.value + ".png"]
    if mone_runs(runs):
        plot_mone(runs, OUT.value + "_mone.png")
        written.append(OUT.value + "_mone.png")
    print(markdown(runs))
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    app.run(main)
