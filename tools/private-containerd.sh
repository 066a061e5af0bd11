# Sourced by scripts that need a private, throw-away containerd (ctr-remote works on
# containerd's content store). After `. tools/private-containerd.sh`:
#   $work  a temp directory, removed on exit
#   $sock  the containerd socket (`ctr -a "$sock" ...`)
# containerd is stopped and $work removed when the sourcing script exits.
work=$(mktemp -d)
sock="$work/containerd.sock"
cat >"$work/config.toml" <<CFG
version = 2
root = "$work/root"
state = "$work/state"
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[debug]
  address = "$sock.debug"
[metrics]
  address = ""
CFG
containerd --config "$work/config.toml" >"$work/containerd.log" 2>&1 &
containerd_pid=$!
private_containerd_cleanup() {
    kill "$containerd_pid" 2>/dev/null || true
    wait "$containerd_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap private_containerd_cleanup EXIT INT TERM
i=0
until ctr -a "$sock" version >/dev/null 2>&1; do
    i=$((i + 1))
    [ "$i" -lt 100 ] || { echo "private containerd did not start:" >&2; cat "$work/containerd.log" >&2; exit 1; }
    sleep 0.1
done
