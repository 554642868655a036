#!/usr/bin/env bash
# Builds the wheel and installs it into a fresh virtual environment (no
# system site-packages, not editable, run from outside the source tree), then
# checks the installed package: the presets ship inside it, every preset is
# listed, and every one builds with load_weights=False with the parameter
# count its registry entry records.
#
# Usage: scripts/check_wheel.sh [python]     (needs PyPI for the dependencies)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${1:-python3}
WORK=$(mktemp -d /tmp/kmm_wheel.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1

# The project files as git sees them (tracked + untracked, not ignored).
mkdir "$WORK/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
    | xargs -0 -I{} sh -c 'test -e "{}" && echo "{}"' \
    | tar -cf - -T -) | tar -xf - -C "$WORK/src"

"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --quiet --upgrade pip
echo "=== building the wheel (isolated build)"
"$VPY" -m pip wheel --quiet --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK"/dist/keras_mobile_moe-*.whl)
echo "built $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB)"
echo "=== installing it into a fresh venv"
"$VPY" -m pip install --quiet "$WHEEL"
"$VPY" -c "import sys; assert sys.prefix != sys.base_prefix; import site; print('system site-packages visible:', any(p.startswith(sys.base_prefix) and 'site-packages' in p for p in sys.path))"

echo "=== checking the installed package"
cd "$WORK"
KERAS_BACKEND=${KERAS_BACKEND:-tensorflow} "$VPY" - "$ROOT" <<'PY'
import os
import sys

import keras_mobile_moe as kmm
from keras_mobile_moe import preset_registry

root = sys.argv[1]
assert "site-packages" in kmm.__file__, kmm.__file__
assert not kmm.__file__.startswith(root), kmm.__file__
folder = preset_registry.presets_dir()
assert "site-packages" in str(folder) and folder.name == "_presets", folder
print("package:", os.path.dirname(kmm.__file__))
print("presets folder:", folder)
shipped = sorted(p.stem for p in folder.glob("*.json"))
source = sorted(
    f[:-5] for f in os.listdir(os.path.join(root, "presets")) if f.endswith(".json")
)
assert shipped == source, (shipped, source)
registry = preset_registry.load_registry()
entries = {e["name"]: e for e in registry.values()}
print(f"{len(entries)} presets, {len(registry)} names with aliases")
import keras

for name, entry in sorted(entries.items()):
    task_cls = getattr(kmm.models, entry["class"])
    assert name in task_cls.presets
    model = task_cls.from_preset(name, load_weights=False)
    params = model.count_params()
    assert params == entry["params"], (name, params, entry["params"])
    print(f"  {name:>14} {entry['family']:>12} {params / 1e6:7.2f}M params  ok")
    del model
    keras.backend.clear_session()
model = kmm.MobileVMoE.from_preset("tiny_e10", load_weights=False)
print("from_preset('tiny_e10', load_weights=False):",
      type(model).__name__, model.count_params(), "params")
print("kmm.MobileVMoE.presets:", sorted(kmm.MobileVMoE.presets))
print("WHEEL CHECK OK")
PY
