#!/usr/bin/env bash
# Install what building and testing Trellis needs on a fresh Debian machine with rustup.
# Safe to run again: each step is skipped when already done.
set -euo pipefail

# apt-get install PACKAGES without starting any service they ship: a policy-rc.d that
# refuses every start is in place while they install (Docker images usually have one
# already), and on a systemd machine the units in $DISABLE are disabled again. The
# tests start what they need themselves, on loopback.
install_quietly() {
    if [ "$(id -u)" -eq 0 ]; then sudo=(); else sudo=(sudo); fi
    local policy=/usr/sbin/policy-rc.d own_policy=false
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# trellis scripts/setup.sh: no service starts while packages install\nexit 101\n' |
            "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod 755 "$policy"
        own_policy=true
        trap '"${sudo[@]}" rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
    if $own_policy; then
        "${sudo[@]}" rm -f "$policy"
        trap - EXIT
    fi
    if [ -n "${DISABLE:-}" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        # shellcheck disable=SC2086
        "${sudo[@]}" systemctl disable --now $DISABLE >/dev/null 2>&1 || true
    fi
}

# --- Apache Kafka (issue 20) -----------------------------------------------------
# The Kafka suites start real Apache Kafka 4.4.0 brokers (KRaft, on loopback) from jars:
# kafka_2.13, kafka-tools (the console clients) and an SLF4J binding, fetched from Maven
# Central with tests/engines/kafka/pom.xml into $TRELLIS_KAFKA_LIBS (default
# ~/.cache/trellis/kafka-4.4.0; host/tests/common/kafka.rs reads the same variable).
# A marker file names the pom it was fetched for: a warm run with the same pom is a no-op.
fetch_kafka() {
    local libs="${TRELLIS_KAFKA_LIBS:-$HOME/.cache/trellis/kafka-4.4.0}"
    local pom
    pom="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/engines/kafka/pom.xml"
    local stamp
    stamp=$(sha256sum "$pom" | cut -c1-16)
    if [ -f "$libs/.fetched-$stamp" ]; then
        return
    fi
    if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
        echo "setup: installing Java 17 and Maven (to fetch and run Apache Kafka)"
        install_quietly openjdk-17-jre-headless maven
    fi
    echo "setup: fetching Apache Kafka 4.4.0 from Maven Central into $libs (30 s to 2 min)"
    rm -rf "$libs"
    mkdir -p "$libs"
    # The pom's directory stays clean: Maven writes only into $libs.
    mvn -q -B -f "$pom" dependency:copy-dependencies -DoutputDirectory="$libs"
    touch "$libs/.fetched-$stamp"
}

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    echo "setup: adding the wasm32-wasip2 Rust target"
    rustup target add wasm32-wasip2
fi

# The web page's test (host/tests/web_page.rs) drives Debian's chromium headless.
if ! command -v chromium >/dev/null; then
    echo "setup: installing chromium (for the web page's test)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y chromium
fi

# Apache Kafka 4.4.0 for the Kafka suites (see fetch_kafka above).
fetch_kafka

# openssl makes the private CA and certificates of the HTTPS tests (es_logging.rs).
if ! command -v openssl >/dev/null; then
    echo "setup: installing openssl (certificates for the HTTPS tests)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y openssl
fi

# A Redfish BMC emulator (sushy-tools' fake driver) and ClusterLabs' own fence_redfish
# (Debian's fence-agents), for the redfish-fence plugin's tests.
if ! command -v sushy-emulator >/dev/null; then
    echo "setup: installing sushy-tools (Redfish emulator)"
    python3 -m pip install -q sushy-tools 2>/dev/null \
        || python3 -m pip install -q --break-system-packages sushy-tools
fi
if ! command -v fence_redfish >/dev/null && [ ! -x /usr/sbin/fence_redfish ]; then
    echo "setup: installing fence-agents (fence_redfish, fence_dummy)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends fence-agents
fi

# componentize-py builds the Python example plugin (examples/python-logger) in
# `cargo xtask bundle`.
if ! command -v componentize-py >/dev/null; then
    echo "setup: installing componentize-py (builds the Python example plugin)"
    python3 -m pip install -q componentize-py==0.25.1 2>/dev/null \
        || python3 -m pip install -q --break-system-packages componentize-py==0.25.1
fi

# An independent Kafka client (pure Python) to read what Trellis wrote to the topics.
if ! python3 -c 'import kafka' 2>/dev/null; then
    echo "setup: installing kafka-python"
    python3 -m pip install -q kafka-python 2>/dev/null \
        || python3 -m pip install -q --break-system-packages kafka-python
fi

# rsyslog: only the binary, as a baseline for the lines benchmark (`cargo xtask bench`),
# which runs its own rsyslogd instance with its own config. The package must not leave
# a system logger running (or enabled) behind: a policy-rc.d that refuses every start is
# in place while it installs (Docker images usually have one already), and on a systemd
# machine the unit it enables is disabled again.
if ! command -v rsyslogd >/dev/null 2>&1; then
    echo "setup: installing rsyslog (for the lines benchmark; not started as a service)"
    DISABLE=rsyslog.service install_quietly rsyslog
    # Whatever the init system, nothing the install started may keep running.
    if [ -s /run/rsyslogd.pid ] && kill -0 "$(cat /run/rsyslogd.pid)" 2>/dev/null; then
        echo "setup: stopping the rsyslogd the package started (pid $(cat /run/rsyslogd.pid))"
        "${sudo[@]}" kill "$(cat /run/rsyslogd.pid)"
    fi
fi

# etcd (3.4, API v3 and its JSON gateway) for the leadership tests, which start their
# own three members on loopback; the package's service must not run.
if ! command -v etcd >/dev/null 2>&1; then
    echo "setup: installing etcd-server and etcd-client (not started as a service)"
    DISABLE=etcd.service install_quietly etcd-server etcd-client
fi

# GlusterFS for the storage-fencing test (host/tests/glusterfs_fence.rs starts its own
# glusterd and volume, and stops them).
if ! command -v glusterd >/dev/null 2>&1 && [ ! -x /usr/sbin/glusterd ]; then
    echo "setup: installing glusterfs-server (not started as a service)"
    DISABLE=glusterd.service install_quietly glusterfs-server
fi

# Pacemaker and corosync, for the test where Pacemaker's fencer drives a Trellis fence
# plugin (host/tests/pacemaker.rs starts its own corosync -f and pacemakerd -f). The
# packages must leave no service running: no service starts while they install.
if ! command -v pacemakerd >/dev/null 2>&1 && [ ! -x /usr/sbin/pacemakerd ]; then
    echo "setup: installing corosync and pacemaker (not started as services)"
    DISABLE="pacemaker.service corosync.service" install_quietly corosync pacemaker pacemaker-cli-utils
fi

# Node.js and npm: `cargo xtask bundle` installs componentize-js (pinned by
# examples/js-logger/package.json, into the target directory) and builds the
# JavaScript example plugin with it.
if ! command -v npm >/dev/null 2>&1; then
    echo "setup: installing nodejs and npm (builds the JavaScript example plugin)"
    install_quietly nodejs npm
fi

# Network namespaces and nftables: the HA partition test (host/tests/ha_partition.rs)
# puts a controller in a namespace it creates and cuts its link to etcd with a rule
# inside that namespace (the host's own rules are never touched).
if ! command -v nft >/dev/null 2>&1 && [ ! -x /usr/sbin/nft ]; then
    echo "setup: installing nftables and iproute2 (partition tests; no service started)"
    DISABLE=nftables.service install_quietly nftables iproute2
fi

# OpenSearch 2.19.6 for the Elasticsearch plugins' suites (host/tests/common/opensearch.rs
# starts one node in-process from these jars, on loopback). The jars come from Maven
# Central with tests/engines/opensearch/pom.xml; TestNode.java is compiled beside them.
# Where: $TRELLIS_OPENSEARCH_DIR, by default ~/.cache/trellis/opensearch-2.19.6 (the tests
# look in the same place). Skipped when the jars and the class are there.
setup_opensearch() {
    local root dir pom_sum
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    dir="${TRELLIS_OPENSEARCH_DIR:-$HOME/.cache/trellis/opensearch-2.19.6}"
    # The jars are fetched again when the pom changes (the stamp holds its checksum).
    pom_sum="$(sha256sum "$root/tests/engines/opensearch/pom.xml" | cut -c1-64)"
    if [ "$(cat "$dir/libs/.complete" 2>/dev/null)" != "$pom_sum" ]; then
        rm -f "$dir/libs/.complete"
    fi
    if [ -e "$dir/libs/.complete" ] && [ -e "$dir/classes/TestNode.class" ] &&
        [ "$dir/classes/TestNode.class" -nt "$root/tests/engines/opensearch/src/TestNode.java" ]; then
        return
    fi
    if ! command -v mvn >/dev/null 2>&1 || ! command -v javac >/dev/null 2>&1; then
        echo "setup: installing Maven and a JDK (Debian's default, 17 on bookworm) for OpenSearch"
        install_quietly maven default-jdk-headless
    fi
    echo "setup: fetching OpenSearch 2.19.6 jars from Maven Central into $dir (about 70 MB)"
    mkdir -p "$dir"
    if [ ! -e "$dir/libs/.complete" ]; then
        rm -rf "$dir/libs"
        mvn -q -B -f "$root/tests/engines/opensearch/pom.xml" dependency:copy-dependencies \
            -DoutputDirectory="$dir/libs"
        echo "$pom_sum" >"$dir/libs/.complete"
    fi
    rm -rf "$dir/classes"
    javac -cp "$dir/libs/*" -d "$dir/classes" "$root/tests/engines/opensearch/src/TestNode.java"
}
setup_opensearch

echo "setup: ok"
