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

source "$(dirname "$0")/apt_packages.sh"

if ensure_packages go-toolchain "tests/test_go_client.py skips" "${PACKAGES[@]}"; then
  echo "go-toolchain: installed ($(go version 2>/dev/null | cut -d' ' -f3)," \
    "$(protoc --version 2>/dev/null))"
fi
exit 0
