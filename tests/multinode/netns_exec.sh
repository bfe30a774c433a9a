#!/bin/sh
# A stand-in for `ssh HOST CMD...` on the namespace hosts of netns.sh: runs CMD inside HOST's
# network namespace (sw-HOST), in a UTS namespace of its own whose host name is HOST, with a
# clean environment and the home directory as cwd (as an ssh login would: nothing of the caller's
# environment leaks through, so the launcher has to propagate what the ranks need).
# Used as `shardwise run --hostfile F --launcher-cmd "tests/multinode/netns_exec.sh" ...`.
# Test faults: SHARDWISE_TEST_BROKEN_HOST=HOST:hang (the command never starts) or HOST:fail
# (exits 255 as ssh does when it cannot connect).
set -eu
host=$1; shift
case "${SHARDWISE_TEST_BROKEN_HOST:-}" in
    "$host:hang") exec sleep 100000 ;;
    "$host:fail") echo "ssh: connect to host $host port 22: Connection refused" >&2; exit 255 ;;
esac
ip netns list | grep -qw "sw-$host" || { echo "netns_exec.sh: no namespace sw-$host (run netns.sh up)" >&2; exit 255; }
exec ip netns exec "sw-$host" unshare --uts -- sh -c 'hostname "$0" && cd "$HOME" && exec "$@"' "$host" \
    env -i HOME="${HOME:-/root}" PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 "$@"
