#!/usr/bin/env bash
# Downloads the Debian packages of mergestream's C dependencies into
# .devdeps/ (git-ignored), for a GPU machine that has CMake and nvcc but no
# package registry: carry .devdeps there and tests/gpu/device_check.sh
# unpacks them before building.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .devdeps
grep -qx '/.devdeps/' .git/info/exclude 2>/dev/null || echo '/.devdeps/' >> .git/info/exclude
cd .devdeps
apt-get download liburing2 liburing-dev libxxhash0 libxxhash-dev libcjson1 libcjson-dev libyaml-0-2 libyaml-dev \
  libcmocka0 libcmocka-dev libopenblas0 libopenblas0-pthread libopenblas-dev libopenblas-pthread-dev libgfortran5 \
  pkgconf pkgconf-bin libpkgconf3 pkg-config
ls -1 | wc -l
