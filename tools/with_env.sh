#!/usr/bin/env bash
# Runs a command inside the project environment: the venv, ROS 2 and the built interfaces.
set -eo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${ROS_DISTRO:-}" ] && [ -f "/opt/ros/$ROS_DISTRO/setup.sh" ]; then . "/opt/ros/$ROS_DISTRO/setup.sh"; fi
. "$ROOT/.venv/bin/activate"
if [ -f "$ROOT/.ros/install/local_setup.sh" ]; then
  COLCON_CURRENT_PREFIX=$ROOT/.ros/install . "$ROOT/.ros/install/local_setup.sh"
fi
# The working tree comes first, so it shadows any installed copy; megaloc_ros/__init__.py
# extends its __path__ to the built interfaces (megaloc_ros.msg / .srv).
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export MEGALOC_ROS_ROOT=$ROOT
# `make test` / `make demo` keep models, weights and engine caches in the repository's .cache/
# (an installed package uses the user's cache directory: see cache_root()).
export MEGALOC_CACHE=${MEGALOC_CACHE:-$ROOT/.cache}
exec "$@"
