#!/usr/bin/env bash
# Installs the Debian packages mergestream builds against (a no-op when they
# are all present). Run as root or with sudo available.
set -euo pipefail
pkgs=(build-essential cmake ninja-build pkg-config clang
      liburing-dev libopenblas-dev libxxhash-dev libcjson-dev libyaml-dev libcmocka-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing: ${missing[*]}" >&2
sudo_cmd=()
[ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
"${sudo_cmd[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}"
