#!/usr/bin/env bash
# The Go toolchain tests/test_go_client.py builds a Go client of omni.v1 with, from Debian's
# packages: go, protoc, protoc-gen-go, protoc-gen-go-grpc and the Go libraries (grpc-go,
# google.golang.org/protobuf, github.com/golang/protobuf 1.5) under /usr/share/gocode, so the
# build works offline in GOPATH mode (no Go module proxy).
#
# Idempotent: when every package is installed it only says so. It installs the missing ones
# with apt-get when running as root on a host with apt-get; otherwise (or when apt-get fails)
# it says why and exits 0, and the Go test skips with the same reason.
set -uo pipefail

PACKAGES=(
  golang-go                            # the go command (Go 1.19 on Debian 12)
  protobuf-compiler                    # protoc
  protoc-gen-go                        # google.golang.org/protobuf's code generator
  protoc-gen-go-grpc                   # grpc-go's service generator
  golang-google-grpc-dev               # google.golang.org/grpc sources
  golang-google-protobuf-dev           # google.golang.org/protobuf sources
  # grpc-go's codec calls github.com/golang/protobuf; 1.5 wraps google.golang.org/protobuf,
  # while the 1.3 alternative apt would otherwise pick predates the messages protoc-gen-go
  # generates.
  golang-github-golang-protobuf-1-5-dev
)

installed() {
  [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "go-toolchain: not a Debian-based host (no dpkg-query); nothing installed," \
    "tests/test_go_client.py skips unless go, protoc and the plugins are at hand"
  exit 0
fi

missing=()
for package in "${PACKAGES[@]}"; do
  installed "$package" || missing+=("$package")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "go-toolchain: already installed ($(go version 2>/dev/null | cut -d' ' -f3)," \
    "$(protoc --version 2>/dev/null))"
  exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
  echo "go-toolchain: not root, nothing installed; missing Debian packages: ${missing[*]}" \
    "(tests/test_go_client.py skips)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "go-toolchain: no apt-get, nothing installed; missing Debian packages: ${missing[*]}" \
    "(tests/test_go_client.py skips)"
  exit 0
fi

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o DPkg::Lock::Timeout=300 "${missing[@]}" >"$log" 2>&1
}

echo "go-toolchain: installing ${missing[*]} with apt-get"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
start=$SECONDS
# The package lists may be absent or stale (a fresh container): update once and retry.
if ! apt_install; then
  echo "go-toolchain: apt-get install failed, running apt-get update and retrying"
  if ! DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$log" 2>&1 || ! apt_install; then
    tail -n 20 "$log"
    echo "go-toolchain: apt-get failed; nothing installed (tests/test_go_client.py skips)"
    exit 0
  fi
fi
echo "go-toolchain: installed in $((SECONDS - start)) s ($(go version | cut -d' ' -f3)," \
  "$(protoc --version))"
