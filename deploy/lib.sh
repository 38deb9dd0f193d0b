# Shared by streamfarm's scripts: install the system packages the farm needs when they are missing.
# Sourced, not run.

# ensure_packages: installs redis-server, ffmpeg (with ffprobe) and nginx through apt when a binary is missing.
ensure_packages() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  { command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1; } || missing+=(ffmpeg)
  { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; } || missing+=(nginx)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  # The HTTPS upstream test makes its certificate with the openssl CLI.
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  # systemd-analyze: the tests verify the shipped units with it.
  command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
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

# nginx_bin: the nginx binary (Debian installs it in /usr/sbin, not always on a user's PATH).
nginx_bin() {
  command -v nginx 2>/dev/null || echo /usr/sbin/nginx
}

# wait_until SECONDS COMMAND...: runs COMMAND (quietly) every 0.1 s until it succeeds; returns 1 if it
# still fails after SECONDS.
wait_until() {
  local tries=$(( $1 * 10 )) i
  shift
  for ((i = 0; i < tries; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  "$@" >/dev/null 2>&1
}

# demo_source_argv PORT: sets DEMO_SOURCE_ARGV to the command of the demo channel's live source
# (real-time test pattern with a tone, H.264/AAC in MPEG-TS over UDP to 127.0.0.1:PORT, 1 s GOP).
demo_source_argv() {
  DEMO_SOURCE_ARGV=(ffmpeg -hide_banner -nostdin -loglevel error -re
    -f lavfi -i "testsrc2=size=1280x720:rate=25" -f lavfi -i "sine=frequency=440:sample_rate=48000"
    -c:v libx264 -preset ultrafast -tune zerolatency -g 25 -keyint_min 25 -sc_threshold 0 -b:v 2000k
    -c:a aac -b:a 128k -f mpegts "udp://127.0.0.1:$1?pkt_size=1316")
}

# proc_gone PID: true when PID has exited (no /proc entry, or a zombie waiting for its parent).
proc_gone() {
  local stat
  { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 0
  stat=${stat##*) }
  [[ $stat == [ZX]* ]]
}

# kill_channel_ffmpegs HLS_ROOT: SIGKILLs the FFmpegs of channel folders under HLS_ROOT that are still
# running, and waits (at most 2 s) until they are gone; sets KILLED_FFMPEGS to how many. An FFmpeg is
# identified as farm-node's start-up sweep does it: its environment names its channel folder
# (STREAMFARM_CHANNEL_DIR=HLS_ROOT/<channel>), which a reused pid never carries. Each FFmpeg leads its
# own process group; the whole group is killed. For a node killed with -9 its FFmpegs are usually
# gone already (parent-death signal); this is the second line, run before the folders (and with them
# the owner files the node's own sweep would use) are removed.
kill_channel_ffmpegs() {
  local root=$1 re files f pid i
  local -a pids=()
  KILLED_FFMPEGS=0
  re=$(printf '%s' "$root" | sed 's/[][\.*^$+?(){}|]/\\&/g')
  files=$(grep -lszE "^STREAMFARM_CHANNEL_DIR=$re/[A-Za-z0-9_-]{1,64}\$" /proc/[0-9]*/environ) || true
  for f in $files; do
    pid=${f#/proc/}
    pid=${pid%/environ}
    [ "$pid" != "$$" ] || continue
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || continue
    pids+=("$pid")
  done
  KILLED_FFMPEGS=${#pids[@]}
  for pid in "${pids[@]}"; do
    for ((i = 0; i < 200; i++)); do
      proc_gone "$pid" && break
      sleep 0.01
    done
  done
}
