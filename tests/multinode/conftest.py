"""Namespace hosts for the multi-host tests: h1, h2 (tests/multinode/netns.sh).

The fixture brings them up when they are not (and takes down only what it brought up); CI sets
them up before `make test` and tears them down itself. Skips name what the machine lacks."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent
NETNS = HERE / "netns.sh"
EXEC = HERE / "netns_exec.sh"


def _lacks() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root (network namespaces need CAP_SYS_ADMIN / CAP_NET_ADMIN)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command on this machine (iproute2 / util-linux)"
    return None


@pytest.fixture(scope="session")
def netns_hosts():
    why = _lacks()
    if why:
        pytest.skip(f"multi-host namespace test: {why}")
    already = subprocess.run(["sh", str(NETNS), "check"], capture_output=True).returncode == 0
    if not already:
        up = subprocess.run(["sh", str(NETNS), "up", "2"], capture_output=True, text=True, timeout=60)
        if up.returncode != 0:
            subprocess.run(["sh", str(NETNS), "down"], capture_output=True, timeout=60)
            pytest.skip("multi-host namespace test: network namespaces are not allowed here "
                        f"(tests/multinode/netns.sh up: {(up.stderr or up.stdout).strip()[-300:]})")
        probe = subprocess.run([str(EXEC), "h2", "hostname"], capture_output=True, text=True, timeout=30)
        if probe.stdout.strip() != "h2":
            subprocess.run(["sh", str(NETNS), "down"], capture_output=True, timeout=60)
            pytest.skip("multi-host namespace test: UTS namespaces (`unshare --uts`) are not allowed here "
                        f"({probe.stderr.strip()[-300:]})")
    yield ["h1", "h2"]
    if not already:
        subprocess.run(["sh", str(NETNS), "down"], capture_output=True, timeout=60)
