# Shared by streamfarm's scripts: install the system packages the farm needs when they are missing.
# Sourced, not run.

# ensure_packages: installs redis-server, ffmpeg (with ffprobe) and nginx through apt when a binary is missing.
ensure_packages() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  { command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1; } || missing+=(ffmpeg)
  { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; } || missing+=(nginx)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "streamfarm: installing ${missing[*]} with apt-get" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # Debian may start the packaged services; the farm runs its own on its own ports.
  if ! command -v cargo >/dev/null 2>&1; then
    echo "streamfarm: cargo is not installed; install a Rust toolchain (1.85 or newer) first" >&2
    return 1
  fi
}
