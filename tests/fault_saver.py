"""Kills a save or an export at chosen points; run by test_fault_injection.

    python tests/fault_saver.py WORKDIR

Runs on the numpy backend (nothing here needs an accelerator, and a forked
child must not hold JAX or TensorFlow threads). For every kill point a child
process is forked that saves (or exports) over a good preset (or file) and
SIGKILLs itself at that point; the parent then checks that the preset still
loads and predicts like the old or the new model (the old one for every point
before the final rename), that the user's own file survived, and that the
file still holds the old bytes. Prints one JSON line: {point: result}.
"""

import json
import os
import signal
import sys
import threading

os.environ["KERAS_BACKEND"] = "numpy"

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras_hub.src.utils import preset_utils  # noqa: E402

import keras_mobile_moe as kmm  # noqa: E402
from keras_mobile_moe import atomic_io  # noqa: E402
from keras_mobile_moe import preset_format  # noqa: E402
from keras_mobile_moe import preset_loader  # noqa: E402
from keras_mobile_moe.export import tflite  # noqa: E402


def build(seed, num_moe_layers):
    keras.utils.set_random_seed(seed)
    backbone = kmm.MobileVMoEBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=2,
        hidden_dim=16,
        num_heads=2,
        mlp_dim=32,
        num_experts=4,
        num_moe_layers=num_moe_layers,
    )
    return kmm.MobileVMoE(
        backbone,
        num_classes=4,
        superclass_ids=[0, 1, 2, 3] if num_moe_layers else None,
    )


def kill_self(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def kill_before(owner, name):
    """Patches owner.name to SIGKILL the process when called."""
    setattr(owner, name, kill_self)


def kill_after(owner, name):
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        kill_self()
        return result

    setattr(owner, name, wrapped)


# Points inside save_to_preset, in the order a save reaches them.
SAVE_POINTS = {
    "first config written": lambda: kill_after(
        preset_utils.KerasPresetSaver, "_save_serialized_object"
    ),
    "task weights written": lambda: kill_after(
        kmm.MobileVMoE, "save_task_weights"
    ),
    "before the backbone weights": lambda: kill_before(
        kmm.MobileVMoEBackbone, "save_weights"
    ),
    "all weights written": lambda: kill_before(preset_loader, "file_sha256"),
    "metadata written": lambda: kill_before(preset_format, "model_card"),
    "user files carried over": lambda: kill_after(preset_loader, "_carry_over"),
    "staging fsynced": lambda: kill_after(atomic_io, "fsync_tree"),
    "right after the swap": lambda: kill_after(atomic_io, "_exchange"),
}
AFTER_SWAP = ("right after the swap",)
TIMED_KILLS = (0.02, 0.05, 0.1, 0.2)


def run_child(arm):
    pid = os.fork()
    if pid == 0:
        try:
            arm()
        finally:
            os._exit(3)  # not killed: the point was never reached
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def main():
    workdir = sys.argv[1]
    folder = os.path.join(workdir, "preset")
    old, new = build(0, 1), build(1, 0)  # a mix of the two cannot load
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3))
    images = (images / 127.5 - 1).astype("float32")
    expected = {
        "old": old.predict(images, verbose=0),
        "new": new.predict(images, verbose=0),
    }
    results = {}

    def check(point, killed, allowed):
        try:
            loaded = kmm.MobileVMoE.from_preset(folder)
            outputs = loaded.predict(images, verbose=0)
            which = [
                name
                for name in allowed
                if np.allclose(outputs, expected[name], atol=1e-5)
            ]
            user_file = open(os.path.join(folder, "notes.txt")).read()
            ok = killed and bool(which) and user_file == "mine"
            results[point] = {"killed": killed, "loads_as": which, "ok": ok}
        except Exception as error:  # reported, not raised: one line of JSON
            results[point] = {
                "killed": killed,
                "ok": False,
                "error": f"{type(error).__name__}: {error}",
            }

    def good_preset():
        old.save_to_preset(folder)
        with open(os.path.join(folder, "notes.txt"), "w") as f:
            f.write("mine")

    for point, arm in SAVE_POINTS.items():
        good_preset()

        def save(arm=arm):
            arm()
            new.save_to_preset(folder)

        killed = run_child(save)
        check(point, killed, ["new"] if point in AFTER_SWAP else ["old"])

    for delay in TIMED_KILLS:
        good_preset()

        def save_forever(delay=delay):
            threading.Timer(delay, kill_self).start()
            while True:
                new.save_to_preset(folder)
                old.save_to_preset(folder)

        killed = run_child(save_forever)
        check(f"killed {delay} s into saving", killed, ["old", "new"])

    # Export: the previous .tflite keeps its bytes when the process dies
    # while writing the new one or just before renaming it.
    path = os.path.join(workdir, "model.tflite")
    good = os.urandom(4096)
    for point in ("export half written", "export before rename"):
        atomic_io.write_bytes(path, good)

        def export(point=point):
            def convert(model, arguments, data=None):
                out = arguments[arguments.index("--out") + 1]
                with open(out, "wb") as f:
                    f.write(b"\0" * 1000)
                    if point == "export half written":
                        f.flush()
                        kill_self()

            tflite.convert_in_subprocess = convert
            if point == "export before rename":
                tflite.inspect_tflite = lambda *a: kill_self()
            tflite.to_tflite(old, path)

        killed = run_child(export)
        with open(path, "rb") as f:
            intact = f.read() == good
        results[point] = {"killed": killed, "ok": killed and intact}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
