#!/usr/bin/env bash
# Emulated aarch64 for the tests: a Debian bookworm arm64 root file system run through
# qemu-user-static and binfmt_misc, in a chroot inside a private mount namespace (so
# nothing stays mounted when a run ends, even a killed one), with Python 3.11, stock
# onnxruntime and the other wheels of .ci/arm-requirements.txt (aarch64 builds, no torch).
#
#   .ci/arm.sh setup            install host packages (apt), register binfmt_misc, build the
#                               root fs and the aarch64 site-packages; cached, ~1 min the first time
#   .ci/arm.sh test [ARGS]      setup, export the test artifacts natively (.venv, torch), then
#                               pytest tests/runtime tests/devices tests/examples tests/fleet under emulation, deselecting
#                               tests marked torch, ort_training, arm (host-side launchers) and
#                               slow_under_emulation (tests/conftest.py); ARGS go to pytest
#   .ci/arm.sh run [--bind DIR]... -- CMD [ARGS]
#                               run CMD (python3 ...) in the root fs, cwd = this repository;
#                               each DIR is made visible at the same path inside
#   .ci/arm.sh ready            exit 0 if setup is complete (nothing is installed)
#
# Inside: this repository at its own path, `edgecl.*` importable from its folders (no
# install step: edits show at once), the host's /dev (pseudo-terminals), an ARM-format
# /proc/cpuinfo (onnxruntime's cpuinfo crashes under qemu on the x86 one), a fresh /tmp.
# Cache: $EDGECL_ARM_CACHE, default ~/.cache/edgecl-arm (root fs + wheels, ~1.1 GB);
# delete it to start from nothing. Needs root (debootstrap, binfmt_misc, chroot).
# Measured on the 2-core CI machine: setup from nothing 89 s (apt 19 s, root fs 47 s, wheels
# 23 s), then 1 s; `test` ~21 min under load (export 21 s, 686 tests emulated in 20 min 57 s).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd -P)
CACHE=$(realpath -m "${EDGECL_ARM_CACHE:-${HOME:-/root}/.cache/edgecl-arm}")
SUITE=bookworm
PYVER=3.11                       # bookworm's python3
PLATFORM=aarch64-manylinux_2_36  # bookworm's glibc
UV_SPEC=uv==0.13.9
REQS=$REPO/.ci/arm-requirements.txt
T0=$(date +%s)
say() { printf '[arm %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*" >&2; }
die() { say "error: $*"; exit 2; }

# Keys of the cached parts: a new package list or suite means a new folder, never a stale one.
ROOTFS=$CACHE/rootfs-$SUITE-arm64
SITE=$CACHE/site-$( { cat "$REQS"; echo "$PLATFORM $PYVER $UV_SPEC"; } | sha256sum | cut -c1-12)
CPUINFO=$CACHE/cpuinfo-arm
# What `test` runs under emulation ($EDGECL_ARM_TESTS overrides it).
ARM_TESTS="tests/runtime tests/devices tests/examples tests/fleet"
# The hang guard: qemu-user 7.2 (bookworm's, the newest Debian has) at times leaves a child
# process hung between fork and exec, in a futex wait that never returns (seen about once per
# full emulated run, each time at a different subprocess call). pytest-timeout fails a test
# that runs past TEST_TIMEOUT_S (the slowest emulated test, test_loop.py's DER++ run, took 106 s) and
# pytest-rerunfailures runs it once more; only a timeout is rerun, a real failure fails. The
# rerun summary at the end shows where each retried test hung.
TEST_TIMEOUT_S=300

# ---------------------------------------------------------------- inside the mount namespace
# `unshare -m` re-enters this script here; every mount below disappears with the namespace.
if [ "${1:-}" = __inside__ ]; then
  shift
  R=$ROOTFS
  mount --make-rprivate /
  mount -t proc proc "$R/proc"
  mount --bind "$CPUINFO" "$R/proc/cpuinfo"
  mount --rbind /sys "$R/sys"
  mount --rbind /dev "$R/dev"
  mount -t tmpfs tmpfs "$R/tmp"
  mount --bind -o ro "$SITE" "$R/opt/edgecl-site"
  [ -d /usr/share/datasets ] && mount --bind -o ro /usr/share/datasets "$R/usr/share/datasets"
  for d in "$REPO" ${ARM_BINDS:-}; do mkdir -p "$R$d"; mount --bind "$d" "$R$d"; done
  # `edgecl.runtime` etc. map to top-level folders (setuptools package-dir): a namespace
  # folder of symlinks gives the same import names without installing anything.
  mkdir -p "$R/tmp/.edgecl-path/edgecl"
  for p in runtime exporters devices fleet bench; do ln -s "$REPO/$p" "$R/tmp/.edgecl-path/edgecl/$p"; done
  keep=()
  for v in CI TERM OMP_WAIT_POLICY $(compgen -v | grep '^EDGECL_TEST_' || true); do
    [ -n "${!v+x}" ] && keep+=("$v=${!v}")
  done
  exec chroot "$R" /usr/bin/env -i HOME=/root LANG=C.UTF-8 LC_ALL=C.UTF-8 PYTHONUNBUFFERED=1 \
    PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
    PYTHONPATH=/tmp/.edgecl-path:/opt/edgecl-site:$REPO "${keep[@]}" \
    /bin/sh -c 'cd "$0" && exec "$@"' "$REPO" "$@"
fi

# ---------------------------------------------------------------- setup steps
host_tools() {
  local need=()
  command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  command -v unshare >/dev/null || need+=(util-linux)
  command -v dpkg-deb >/dev/null || need+=(dpkg)
  if [ ${#need[@]} -gt 0 ]; then
    say "apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
}

binfmt() {
  # The kernel runs aarch64 ELF files through qemu. Debian's entry has the F flag: the
  # interpreter is opened at registration, so it works inside a chroot without qemu.
  local dir=/proc/sys/fs/binfmt_misc conf=/usr/lib/binfmt.d/qemu-aarch64.conf
  [ -e $dir/register ] || mount -t binfmt_misc binfmt_misc $dir \
    || die "cannot mount binfmt_misc at $dir (a container without that privilege?)"
  if [ ! -e $dir/qemu-aarch64 ]; then
    [ -f $conf ] || die "$conf missing: is qemu-user-static installed?"
    grep -v '^#' $conf | head -1 | tr -d '\n' > $dir/register
  fi
  grep -q '^enabled' $dir/qemu-aarch64 || echo 1 > $dir/qemu-aarch64
  grep -q '^flags: .*F' $dir/qemu-aarch64 || die "binfmt qemu-aarch64 lacks the F flag: $(cat $dir/qemu-aarch64)"
}

debian_mirror() {
  # the archive this machine's apt already uses (one-line or deb822 sources)
  local m
  m=$( { grep -hE '^deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
           | sed -E 's/\[[^]]*\]//' | awk '{print $2}'
         grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}'; } \
       | grep -E '/debian/?$' | head -1 || true)
  echo "${m:-http://deb.debian.org/debian}"
}

root_fs() {
  [ -f "$ROOTFS/.ready" ] && return
  grep -q " $ROOTFS/" /proc/self/mountinfo && die "something is mounted under $ROOTFS; not touching it"
  local mirror; mirror=$(debian_mirror)
  say "root fs: debootstrap --foreign arm64 $SUITE from $mirror"
  rm -rf "$ROOTFS"; mkdir -p "$ROOTFS" "$CACHE/debs"
  # Only debootstrap's first stage (unpacking, no emulation). Its --include packages are
  # downloaded but left packed: unpack them here on the host instead of the emulated second
  # stage (minutes). No maintainer scripts run: enough to run python, not to use apt inside.
  debootstrap --arch=arm64 --variant=minbase --foreign --include=python3,ca-certificates \
    --cache-dir="$CACHE/debs" "$SUITE" "$ROOTFS" "$mirror" > "$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
  local required deb name n=0
  required=" $(tr '\n' ' ' < "$ROOTFS/debootstrap/required") "
  for deb in "$ROOTFS"/var/cache/apt/archives/*.deb; do
    name=$(basename "$deb"); name=${name%%_*}
    case "$required" in *" $name "*) continue ;; esac
    # keep the merged-/usr symlinks (bin -> usr/bin ...) that `dpkg -x` would replace
    dpkg-deb --fsys-tarfile "$deb" | tar -xf - -C "$ROOTFS" --keep-directory-symlink
    n=$((n + 1))
  done
  [ -L "$ROOTFS/bin" ] && [ -L "$ROOTFS/lib" ] || die "root fs lost its merged-/usr symlinks"
  rm -f "$ROOTFS"/var/cache/apt/archives/*.deb
  [ -f "$ROOTFS/etc/passwd" ] || cp "$ROOTFS/usr/share/base-passwd/passwd.master" "$ROOTFS/etc/passwd"
  [ -f "$ROOTFS/etc/group" ] || cp "$ROOTFS/usr/share/base-passwd/group.master" "$ROOTFS/etc/group"
  printf '127.0.0.1 localhost\n::1 localhost\n' > "$ROOTFS/etc/hosts"
  # inside a container debootstrap may leave proc as a symlink to the host's /proc
  [ -L "$ROOTFS/proc" ] && rm -f "$ROOTFS/proc"
  mkdir -p "$ROOTFS"/{proc,sys,dev,tmp,root,opt/edgecl-site,usr/share/datasets}
  chmod 1777 "$ROOTFS/tmp"
  say "root fs: unpacked $n more packages on the host"
  "$(command -v qemu-aarch64-static)" -L "$ROOTFS" "$ROOTFS/usr/bin/python3" -c \
    'import platform, sys; assert platform.machine() == "aarch64", platform.machine(); print(sys.version.split()[0])' \
    >/dev/null || die "the emulated python3 does not start"
  touch "$ROOTFS/.ready"
  say "root fs ready: $(du -sh "$ROOTFS" | cut -f1)"
}

fake_cpuinfo() {
  # an ARM-format /proc/cpuinfo, one entry per host core (Neoverse-N1-like features)
  [ -f "$CPUINFO" ] && return
  local i
  for i in $(seq 0 $(( $(nproc) - 1 ))); do
    printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' "$i"
  done > "$CPUINFO.tmp"
  mv "$CPUINFO.tmp" "$CPUINFO"
}

host_python() {
  # the repository's .venv if bootstrap made it, else the system python (with pip)
  if [ -x "$REPO/.venv/bin/python" ]; then echo "$REPO/.venv/bin/python"; return; fi
  if ! python3 -m pip --version >/dev/null 2>&1; then
    apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  command -v python3
}

site_packages() {
  [ -f "$SITE/.ready" ] && return
  local py uv=$CACHE/uv/bin/uv
  py=$(host_python)
  if [ ! -x "$uv" ]; then
    say "pip install $UV_SPEC (host tool resolving aarch64 wheels)"
    "$py" -m pip install -q --disable-pip-version-check --target "$CACHE/uv" "$UV_SPEC"
  fi
  say "aarch64 wheels for cp${PYVER/./} $PLATFORM: $(grep -v '^#' "$REQS" | grep . | tr '\n' ' ')"
  rm -rf "$SITE"
  # uv evaluates markers for the target platform (pip --platform evaluates them for the host).
  # Bytecode compiled on the host is valid for the emulated 3.11 and saves emulated time.
  local compile=()
  [ "$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$PYVER" ] && compile=(--compile-bytecode)
  UV_CACHE_DIR=$CACHE/uv-cache "$uv" pip install --no-config -q "${compile[@]}" --target "$SITE" \
    --python "$py" --python-platform "$PLATFORM" --python-version "$PYVER" --only-binary :all: -r "$REQS"
  touch "$SITE/.ready"
  say "site-packages ready: $(du -sh "$SITE" | cut -f1)"
}

setup() {
  [ "$(id -u)" = 0 ] || die "needs root (apt-get, binfmt_misc, debootstrap, chroot)"
  [ "$(uname -m)" = x86_64 ] || die "written for an x86-64 host, this is $(uname -m)"
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"; flock 9  # one setup at a time per cache
  host_tools
  binfmt
  fake_cpuinfo
  root_fs
  site_packages
  flock -u 9; exec 9>&-
  say "ready (cache $CACHE, $(du -sh "$CACHE" | cut -f1))"
}

ready() {
  [ -f "$ROOTFS/.ready" ] && [ -f "$SITE/.ready" ] && [ -f "$CPUINFO" ] \
    && grep -qs '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64
}

run() {
  local binds=()
  while [ $# -gt 0 ]; do
    case $1 in
      --bind) binds+=("$(realpath "$2")"); shift 2 ;;
      --) shift; break ;;
      *) break ;;
    esac
  done
  [ $# -gt 0 ] || die "run: no command given"
  ready || die "not set up: run .ci/arm.sh setup (as root)"
  ARM_BINDS="${binds[*]:-}" exec unshare -m --propagation private -- bash "$REPO/.ci/arm.sh" __inside__ "$@"
}

case "${1:-}" in
  setup) setup ;;
  ready) ready ;;
  run) shift; run "$@" ;;
  test)
    shift
    [ -x "$REPO/.venv/bin/python" ] || die "no .venv: run ./bootstrap.sh test first (the artifacts are exported with torch)"
    setup
    art=$(mktemp -d "$CACHE/artifacts.XXXXXX")
    trap 'rm -rf "$art"' EXIT
    say "exporting the test artifacts natively (x86-64, torch) into $art"
    (cd "$REPO" && OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m tests.helpers export-fixtures "$art")
    tests=${EDGECL_ARM_TESTS:-$ARM_TESTS}
    say "pytest $tests under emulated aarch64"
    set +e
    (run --bind "$art" -- env EDGECL_TEST_ARTIFACTS="$art" EDGECL_TEST_TIME_SCALE=10 OMP_WAIT_POLICY=PASSIVE \
       python3 -m pytest $tests -p no:cacheprovider \
       -m "not torch and not ort_training and not arm and not slow_under_emulation" \
       --timeout "$TEST_TIMEOUT_S" --reruns 1 --only-rerun "from pytest-timeout" --rerun-show-tracebacks "$@")
    rc=$?
    rmdir "$ROOTFS$art" 2>/dev/null || true  # the empty mount point
    say "pytest under emulated aarch64: exit $rc"
    exit $rc ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2; exit 2 ;;
esac
