#!/bin/sh
# Test hosts for tests/multinode: network namespaces sw-h1..sw-hN on one machine, wired to a
# bridge that lives in its own namespace (sw-lan), so the machine's own network and firewall are
# not touched. Host hI has address 10.213.0.I/24 and resolves h1..hN (/etc/netns/sw-hI/hosts,
# which `ip netns exec` mounts over /etc/hosts). Idempotent.
#   netns.sh up [N]   create N hosts (default 3)
#   netns.sh down     remove every sw-* namespace and /etc/netns/sw-*
#   netns.sh check    exit 0 if the hosts are up
set -eu
N=${2:-3}
SUBNET=${SHARDWISE_NETNS_SUBNET:-10.213.0}

up() {
    command -v ip >/dev/null || { echo "netns.sh: no \`ip\` command (iproute2)" >&2; exit 3; }
    [ "$(id -u)" = 0 ] || { echo "netns.sh: not root" >&2; exit 3; }
    ip netns list | grep -qw sw-lan || ip netns add sw-lan
    ip -n sw-lan link show br0 >/dev/null 2>&1 || ip -n sw-lan link add br0 type bridge
    ip -n sw-lan link set br0 up
    ip -n sw-lan link set lo up
    i=1
    while [ "$i" -le "$N" ]; do
        ns=sw-h$i
        ip netns list | grep -qw "$ns" || ip netns add "$ns"
        if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
            ip link del "swv$i" 2>/dev/null || true
            ip link add "swv$i" type veth peer name "swp$i"
            ip link set "swv$i" netns sw-lan
            ip link set "swp$i" netns "$ns"
            ip -n "$ns" link set "swp$i" name eth0
            ip -n sw-lan link set "swv$i" master br0
            ip -n sw-lan link set "swv$i" up
            ip -n "$ns" addr add "$SUBNET.$i/24" dev eth0
        fi
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
        mkdir -p "/etc/netns/$ns"
        {
            echo "127.0.0.1 localhost"
            j=1
            while [ "$j" -le "$N" ]; do echo "$SUBNET.$j h$j"; j=$((j + 1)); done
        } > "/etc/netns/$ns/hosts"
        echo "h$i" > "/etc/netns/$ns/hostname"
        i=$((i + 1))
    done
    # the bridge has STP off: its ports forward at once (no ping on minimal machines to check)
}

down() {
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^sw-' || true); do
        ip netns del "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    check) ip netns list | grep -qw sw-h1 ;;
    *) echo "usage: netns.sh up [N] | down | check" >&2; exit 2 ;;
esac
