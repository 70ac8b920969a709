# Sourced by the scripts that install test tools from Debian's packages (install_go.sh,
# install_netns_tools.sh). `ensure_packages LABEL SKIPPED PACKAGE...` installs the missing
# packages with apt-get when running as root on a host with apt-get; otherwise (or when
# apt-get fails) it says why, naming SKIPPED (the tests that then skip). It returns 0 when every
# package is installed at the end, 1 when not; it never exits the caller.

_installed() {
  [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

ensure_packages() {
  local label="$1" skipped="$2"
  shift 2
  if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "$label: not a Debian-based host (no dpkg-query); nothing installed ($skipped" \
      "unless the tools are at hand)"
    return 1
  fi
  local missing=() package
  for package in "$@"; do
    _installed "$package" || missing+=("$package")
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    return 0
  fi
  if [[ "$(id -u)" -ne 0 ]]; then
    echo "$label: not root, nothing installed; missing Debian packages: ${missing[*]} ($skipped)"
    return 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "$label: no apt-get, nothing installed; missing Debian packages: ${missing[*]}" \
      "($skipped)"
    return 1
  fi
  echo "$label: installing ${missing[*]} with apt-get"
  local log start=$SECONDS
  log="$(mktemp)"
  _apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      -o DPkg::Lock::Timeout=300 "${missing[@]}" >"$log" 2>&1
  }
  # The package lists may be absent or stale (a fresh container): update once and retry.
  if ! _apt_install; then
    echo "$label: apt-get install failed, running apt-get update and retrying"
    if ! DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$log" 2>&1 || ! _apt_install; then
      tail -n 20 "$log"
      rm -f "$log"
      echo "$label: apt-get failed; nothing installed ($skipped)"
      return 1
    fi
  fi
  rm -f "$log"
  echo "$label: installed in $((SECONDS - start)) s"
  return 0
}
