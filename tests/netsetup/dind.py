"""A nested Docker engine for the end-to-end test of engines the host does not run.

The host runs one engine version; the plan must hold for others (Docker 28 adds a raw-table DROP
for routed traffic to containers). Debian sid ships docker.io 28.x, so its root filesystem,
bootstrapped with mmdebstrap from the mirror the host's apt already uses, imported as an image
and run with enough capabilities, gives a real Docker 28 engine without any registry. The image is
cached under a fixed tag and bootstrapped only when missing, since bootstrapping downloads ~400 MB.

Usable as a script: ``python tests/netsetup/dind.py [SUITE...]`` builds the cached images ahead
of a test run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# The Debian suite whose docker.io gives each engine version the plan must hold for.
ENGINES = {"sid": "28.", "trixie": "26."}
PACKAGES = "docker.io,iptables,iproute2,ca-certificates,procps"


def apt_mirror() -> str:
    """The Debian URI this machine's own apt sources use: the only Debian mirror it may reach."""
    candidates = [Path("/etc/apt/sources.list")]
    sources_d = Path("/etc/apt/sources.list.d")
    if sources_d.is_dir():
        candidates += sorted(sources_d.iterdir())
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("#"):
                continue
            match = re.match(r"URIs:\s*(\S+)", line) or re.match(
                r"deb\s+(?:\[[^]]*\]\s+)?(\S+)", line
            )
            if match and "security" not in match.group(1):
                return match.group(1)
    raise RuntimeError("no Debian mirror found in the apt sources")


def image_for(suite: str) -> str:
    return f"netsetup-test-dind:{suite}"


def image_exists(image: str) -> bool:
    return (
        subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0
    )


def build_image(suite: str) -> None:
    """Bootstrap the suite's rootfs with mmdebstrap and import it; a no-op when it is cached."""
    image = image_for(suite)
    if image_exists(image):
        return
    if shutil.which("mmdebstrap") is None:
        raise RuntimeError("mmdebstrap is not installed (apt-get install mmdebstrap)")
    with tempfile.TemporaryDirectory() as tmp:
        tar = os.path.join(tmp, "dind.tar")
        command = [
            "mmdebstrap", "--variant=apt", '--aptopt=Acquire::Retries "3"',
            '--aptopt=Acquire::Check-Valid-Until "false"', f"--include={PACKAGES}",
            suite, tar, apt_mirror(),
        ]  # fmt: skip
        # sid and trixie move daily: a mirror caught mid-sync fails once, then works.
        if subprocess.run(command, stdout=subprocess.DEVNULL).returncode != 0:
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["docker", "import", tar, image], check=True, stdout=subprocess.DEVNULL)


@dataclass
class NestedEngine:
    """A running nested engine: its container, socket and the pid whose netns it lives in.

    `report_dir` is mounted at the same path inside, so the host service the nested engine runs
    reads its deployment record and writes its report where netsetup on this host
    (NETSETUP_STATE_DIR, NETSETUP_RUN_DIR) writes and reads them.
    """

    name: str
    run_dir: str
    report_dir: str

    @property
    def docker_host(self) -> str:
        return f"unix://{self.run_dir}/docker.sock"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DOCKER_HOST": self.docker_host,
            "NETSETUP_RUN_DIR": self.report_dir,
            "NETSETUP_STATE_DIR": f"{self.report_dir}/state",
        }

    def docker(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", *args], env=self.env(), **kwargs)

    def dockerd_pid(self) -> int:
        """Host pid of the nested dockerd; its network namespace is the nested engine's."""
        out = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Pid}}", self.name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return int(out)

    def restart_daemon(self, timeout: float = 60) -> None:
        """Stop dockerd inside the container; the supervising loop starts it again."""
        subprocess.run(["docker", "exec", self.name, "pkill", "-x", "dockerd"], check=True)
        time.sleep(3)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.docker("info", capture_output=True).returncode == 0:
                return
            time.sleep(1)
        raise RuntimeError("nested engine did not come up")

    def stop(self) -> None:
        subprocess.run(["docker", "rm", "-f", "-v", self.name], capture_output=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self.report_dir, ignore_errors=True)


def start_engine(
    name: str, suite: str, dockerd_args: str = "", legacy_iptables: bool = False
) -> NestedEngine:
    """Run dockerd nested, restarted by a shell loop so a test can restart the daemon alone.

    `dockerd_args` are daemon options, e.g. ``--iptables=false`` for an engine that leaves the
    firewall alone; `legacy_iptables` makes iptables-legacy the engine's (and the host
    service's) iptables. Each start begins without /run/xtables.lock, as after a boot."""
    legacy = (
        "update-alternatives --set iptables /usr/sbin/iptables-legacy >/dev/null; "
        "update-alternatives --set ip6tables /usr/sbin/ip6tables-legacy >/dev/null; "
        if legacy_iptables else ""
    )  # fmt: skip
    run_dir = tempfile.mkdtemp(prefix="netsetup-dind-")
    report_dir = tempfile.mkdtemp(prefix="netsetup-dind-report-")
    subprocess.run(
        [
            "docker", "run", "-d", "--name", name,
            "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
            "--security-opt", "seccomp=unconfined",
            "--security-opt", "apparmor=unconfined",
            "--security-opt", "systempaths=unconfined",
            "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
            "-v", f"{run_dir}:/var/run",
            "-v", f"{report_dir}:{report_dir}",
            "--tmpfs", "/var/lib/docker:exec,size=3g",
            # a host of its own has IPv6 (the engine turns it off where its network has none)
            "--sysctl", "net.ipv6.conf.all.disable_ipv6=0",
            "--sysctl", "net.ipv6.conf.default.disable_ipv6=0",
            image_for(suite),
            "sh", "-c",
            f"mount -t tmpfs none /tmp; {legacy}"
            "while true; do rm -rf /run/xtables.lock; "
            f"dockerd {dockerd_args} >>/tmp/dockerd.log 2>&1; sleep 1; done",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    engine = NestedEngine(name=name, run_dir=run_dir, report_dir=report_dir)
    try:
        engine.wait_ready()
    except Exception:
        engine.stop()
        raise
    return engine


if __name__ == "__main__":
    for suite in sys.argv[1:] or ENGINES:
        build_image(suite)
        print(image_for(suite))
