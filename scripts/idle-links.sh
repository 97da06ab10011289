#!/usr/bin/env bash
# Idle links (docs/SCALE.md, "Idle links"): what idle agents cost one controller and
# themselves. Starts one controller and N agent processes over tcp-transport (default
# heartbeat, 2 s), waits until every agent is connected and a settling period passed,
# then reads each process's CPU time (utime + stime, /proc/PID/stat) over S seconds
# and prints the figures against the targets:
#   an idle connected agent costs the controller <= 0.05 % of a core,
#   an idle agent costs itself <= 0.1 % of a core.
#
# usage: scripts/idle-links.sh [--agents N] [--seconds S] [--trellis BIN] [--bundle DIR]
#                              [--transport DIR] [--kafka BROKERS]
#   --transport: another build of the transport (e.g. the 0.1.0 fixture
#   $CARGO_TARGET_DIR/fixtures/tcp-transport-v0-1, which the host polls), used in place
#   of the bundle's tcp-transport: the same binary measured polled and event-driven.
#   --kafka: over the bundle's kafka-transport (or --transport DIR, another build of it)
#   through the Kafka broker at BROKERS (host:port, already running: e.g.
#   `tansu broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url
#   tcp://127.0.0.1:9092 --storage-engine memory://tansu/`), on topics of a fresh prefix.
#   --kafka-properties: librdkafka settings for both sides' [kafka] properties, as a TOML
#   inline table, e.g. '{ "fetch.wait.max.ms" = "500" }'.
#   defaults: 20 agents, 60 s, $CARGO_TARGET_DIR/release/trellis (or target/release),
#   $TRELLIS_BUNDLE_DIR (or $CARGO_TARGET_DIR/bundle). Build first:
#   cargo build --release -p trellis && cargo xtask bundle
# Loopback only; everything lives in a temporary directory, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${CARGO_TARGET_DIR:-target}
agents=20
seconds=60
settle=10
trellis="$target/release/trellis"
bundle=${TRELLIS_BUNDLE_DIR:-$target/bundle}
while [ $# -gt 0 ]; do
    case "$1" in
        --agents) agents=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        --settle) settle=$2; shift 2 ;;
        --trellis) trellis=$2; shift 2 ;;
        --bundle) bundle=$2; shift 2 ;;
        --transport) transport_dir=$2; shift 2 ;;
        --kafka) kafka=$2; shift 2 ;;
        --kafka-properties) kafka_properties=$2; shift 2 ;;
        *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
[ -x "$trellis" ] || { echo "no trellis binary at $trellis: cargo build --release -p trellis, or pass --trellis" >&2; exit 2; }
[ -d "$bundle/tcp-transport" ] || { echo "no plugin bundle at $bundle: cargo xtask bundle, or pass --bundle" >&2; exit 2; }
trellis=$(realpath "$trellis")
bundle=$(realpath "$bundle")
default_transport=tcp-transport
[ -n "${kafka:-}" ] && default_transport=kafka-transport
transport_dir=$(realpath "${transport_dir:-$bundle/$default_transport}")
tname=$(sed -n 's/^name = "\(.*\)"/\1/p' "$transport_dir/plugin.toml" | head -1)

dir=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port=$(free_port)
http=$(free_port)

mkdir -p "$dir/state/logs" "$dir/plugins"
for p in "$bundle"/*/; do
    [ "$(basename "$p")" = "$tname" ] || ln -s "$p" "$dir/plugins/$(basename "$p")"
done
ln -s "$transport_dir" "$dir/plugins/$tname"
{
    for i in $(seq 1 "$agents"); do echo "agent-$i = \"secret-of-agent-$i\""; done
} >"$dir/secrets.toml"
chmod 600 "$dir/secrets.toml"
# The transport's own settings, for both sides.
if [ -n "${kafka:-}" ]; then
    prefix="idle$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')"
    controller_side="kafka = { topics = [\"$prefix.\"] }
config = { prefix = \"$prefix\" }"
    agent_side=$controller_side
    cluster_conf="[kafka]
brokers = \"$kafka\"
properties = ${kafka_properties:-{\}}"
else
    controller_side="sockets = { bind = [\"127.0.0.1:$port\"] }
config = { address = \"127.0.0.1:$port\" }"
    agent_side="sockets = { connect = [\"127.0.0.1:$port\"] }
config = { address = \"127.0.0.1:$port\" }"
    cluster_conf=""
fi
agent_map=$(for i in $(seq 1 "$agents"); do printf '"idle-%s" = "agent-%s", ' "$i" "$i"; done)
cat >"$dir/controller.toml" <<EOF
[runtime]
plugin-dir = "$dir/plugins"
[secrets]
file = "secrets.toml"
[controller]
state-dir = "state"
http = "127.0.0.1:$http"
transport = "$tname"
agents = { ${agent_map%, } }
[plugins.file-logging]
dirs = [{ host = "state/logs", guest = "/logs", mode = "read-write" }]
[plugins.file-browser]
dirs = [{ host = "state/logs", guest = "/logs" }]
$cluster_conf
[plugins.$tname]
$controller_side
EOF
for i in $(seq 1 "$agents"); do
    mkdir -p "$dir/agent-$i"
    cp "$dir/secrets.toml" "$dir/agent-$i/secrets.toml"
    cat >"$dir/agent-$i/agent.toml" <<EOF
[runtime]
plugin-dir = "$dir/plugins"
[secrets]
file = "secrets.toml"
[agent]
name = "idle-$i"
labels = ["idle"]
secret = "agent-$i"
workspace = "work"
transport = "$tname"
$cluster_conf
[plugins.$tname]
$agent_side
EOF
done

(cd "$dir" && TRELLIS_LOG=info exec "$trellis" controller --config controller.toml >controller.log 2>&1) &
controller=$!
pids+=("$controller")
sleep 1
agent_pids=()
for i in $(seq 1 "$agents"); do
    (cd "$dir/agent-$i" && TRELLIS_LOG=warn exec "$trellis" agent --config agent.toml >agent.log 2>&1) &
    agent_pids+=("$!")
    pids+=("$!")
done

# Every agent connected (the controller logs each one).
for _ in $(seq 1 600); do
    n=$(grep -c "agent connected" "$dir/controller.log" || true)
    [ "$n" -ge "$agents" ] && break
    sleep 0.1
done
n=$(grep -c "agent connected" "$dir/controller.log" || true)
if [ "$n" -lt "$agents" ]; then
    echo "only $n of $agents agents connected within 60 s; controller log:" >&2
    tail -20 "$dir/controller.log" >&2
    exit 1
fi
sleep "$settle"

ticks() { # utime + stime of PID, in clock ticks
    awk '{ print $14 + $15 }' "/proc/$1/stat"
}
hz=$(getconf CLK_TCK)
c0=$(ticks "$controller")
a0=()
for p in "${agent_pids[@]}"; do a0+=("$(ticks "$p")"); done
sleep "$seconds"
c1=$(ticks "$controller")
a_total=0
a_max=0
for k in "${!agent_pids[@]}"; do
    d=$(( $(ticks "${agent_pids[$k]}") - a0[k] ))
    a_total=$(( a_total + d ))
    [ "$d" -gt "$a_max" ] && a_max=$d
done
for p in "$controller" "${agent_pids[@]}"; do
    kill -0 "$p" 2>/dev/null || { echo "process $p died during the measurement" >&2; exit 1; }
done

python3 - "$hz" "$seconds" "$agents" "$((c1 - c0))" "$a_total" "$a_max" "$tname" <<'EOF'
import sys
hz, secs, n, c, a_total, a_max = (float(x) for x in sys.argv[1:7])
tname = sys.argv[7]
pct = lambda ticks: ticks / hz / secs * 100
ctl = pct(c)
per_agent_ctl = ctl / n
agent_avg = pct(a_total) / n
agent_max = pct(a_max)
ok = lambda v, t: "ok" if v <= t else "MISSED"
print(f"idle links: {int(n)} agents over {tname}, {int(secs)} s, clock tick {1000 / hz:.0f} ms")
print(f"  controller                      {ctl:7.3f} % of a core")
print(f"  controller per idle agent       {per_agent_ctl:7.4f} % of a core   target <= 0.05 %   {ok(per_agent_ctl, 0.05)}")
print(f"  agent, mean of {int(n):<3}             {agent_avg:7.4f} % of a core   target <= 0.1 %    {ok(agent_avg, 0.1)}")
print(f"  agent, busiest                  {agent_max:7.4f} % of a core")
EOF
