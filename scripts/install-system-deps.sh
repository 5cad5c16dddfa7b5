#!/usr/bin/env bash
# System packages the test suite needs: bubblewrap (the evaluation sandbox), Debian's
# chromium (the playground's browser test) and g++ (the AMX matmul kernel, diffcoder/kernels). Installed only when missing, only as root with
# apt-get available; elsewhere the tests that need them say what is missing and skip.
set -u
need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v g++ >/dev/null 2>&1 || need+=(g++)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: missing system packages (${need[*]}); install them for the sandbox/browser tests" >&2
  exit 0
fi
echo "installing system packages: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
  || echo "warning: apt-get install ${need[*]} failed" >&2
