#!/usr/bin/env bash
# The Debian packages the test suite's real-component tiers need, in one place
# for both `make test` and .ci/run.
#
#   scripts/install-deps.sh           install what is missing (root; apt-get)
#   scripts/install-deps.sh --check   install nothing: name each tier whose tests
#                                     will be skipped here, and the command that
#                                     installs what it needs (exit 0 either way)
set -euo pipefail

# tier | what it tests | commands that must exist | Debian packages for them | needs root to run
TIERS=(
  "build|make and Python 3.11|make python3.11|make python3.11 python3.11-venv|no"
  "bench-smoke|the swarm benchmark's smoke test (namespaces, tc, curl)|tc curl|iproute2 curl|yes"
  "bench-baselines|the benchmarks' nginx origin and BitTorrent baseline|nginx aria2c mktorrent opentracker|nginx aria2 mktorrent opentracker|no"
  "images|e2e images and Range requests, preheat (real registry, skopeo)|docker-registry skopeo htpasswd|docker-registry skopeo apache2-utils|no"
  "containerd|e2e containerd pulls through dfdaemon|containerd ctr|containerd|yes"
  "docker|e2e Docker engine pulls through dfdaemon|dockerd|docker.io|yes"
  "podman|e2e podman pulls through dfdaemon|podman|podman|no"
  "dashboard|the dashboard in a real browser|chromium|chromium|no"
)

missing_packages() {  # all packages of a tier if any of its commands is absent
  local cmd
  for cmd in $1; do
    if ! command -v "$cmd" >/dev/null 2>&1; then
      echo "$2"
      return
    fi
  done
}

check() {
  local skipped=0 all=() tier
  for tier in "${TIERS[@]}"; do
    IFS='|' read -r name what cmds pkgs root <<<"$tier"
    [ "$name" = build ] && continue  # without these there is no test run to report on
    local miss
    miss=$(missing_packages "$cmds" "$pkgs")
    if [ -n "$miss" ]; then
      echo "skipped tier '$name' ($what): missing Debian packages: $miss"
      all+=($miss)
      skipped=1
    elif [ "$root" = yes ] && [ "$(id -u)" != 0 ]; then
      echo "skipped tier '$name' ($what): its tests need root"
      skipped=1
    fi
  done
  if [ ${#all[@]} -gt 0 ]; then
    echo "install them all with: sudo $0   (apt-get install -y ${all[*]})"
  fi
  if [ "$skipped" = 0 ]; then echo "no test tier skipped for want of packages or root"; fi
}

install() {
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps.sh: needs root (apt-get); run: sudo $0" >&2
    exit 1
  fi
  local need=() tier
  for tier in "${TIERS[@]}"; do
    IFS='|' read -r name what cmds pkgs root <<<"$tier"
    local miss
    miss=$(missing_packages "$cmds" "$pkgs")
    if [ -n "$miss" ]; then need+=($miss); fi
  done
  if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need[@]}"
  fi
}

case "${1:-}" in
  --check) check ;;
  "") install ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac
