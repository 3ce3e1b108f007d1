"""Outbound network for a ``network=on`` sandbox, without the host's network namespace.

Every sandbox has a network namespace of its own. Without ``network`` bubblewrap makes it
(loopback only). With ``network`` the runner starts bubblewrap inside a fresh namespace its
spawned process makes as root (``ChildSetup.new_network``, :mod:`.spawner`) and, before the command is released,
:meth:`SlirpNat.attach` starts ``slirp4netns`` on it: it creates ``tap0`` (10.0.2.100/24,
gateway 10.0.2.2, DNS forwarder 10.0.2.3) and turns the sandbox's TCP/UDP flows into
ordinary sockets of its own in the worker's namespace. Why not attach to bubblewrap's own
namespace: bubblewrap configures its loopback after it has reported its pid, and two
configurations at once make its netlink requests fail (seen: ``bwrap: loopback: Failed
RTM_NEWADDR``); and a namespace made by the worker belongs to the worker's user namespace,
so nothing in the sandbox ever holds a capability over it. What the command can reach:

* **not the host's loopback**: ``127.0.0.1`` inside is the sandbox's own loopback, and the
  gateway address that slirp would map to the host's loopback is refused
  (``--disable-host-loopback``);
* **not the host's abstract UNIX sockets**: they belong to a network namespace, and the
  sandbox is never in the host's;
* **not the host's own addresses** (where the worker's metrics port, a local scheduler or
  its CAS listen on ``0.0.0.0``): slirp's sockets live in the host's namespace, so a flow to
  the host's ``eth0`` address would arrive at the host. Before the command runs, every
  local address of the worker's namespace gets an ``unreachable`` route in the sandbox's
  namespace; the command cannot remove it (the namespace belongs to the worker's user
  namespace, in which the sandbox has no capability);
* everything else a process of the host could reach: the operator's firewall decides.

Why slirp4netns rather than passt's ``pasta``: pasta copies the host's addresses, routes
and gateway into the namespace (host facts inside, and the host's own address then is the
sandbox's) and by default forwards the namespace's connections to ports of the host's
loopback (``-T auto``/``-U auto``) — the hole this module exists to close; each must be
turned off by hand, and the Debian 12 pasta has no readiness descriptor. slirp4netns has a
fixed private addressing that says nothing of the host, ``--disable-host-loopback``, a
``--ready-fd`` (no polling) and an ``--exit-fd`` (it dies with the descriptor, so with the
worker), and confines itself (``--enable-sandbox``: an empty root and no capabilities but
``CAP_NET_BIND_SERVICE``; ``--enable-seccomp``). Its throughput (hundreds of MB/s) is
plenty for fetching dependencies. It runs as root because ``/dev/net/tun`` is root-only
on Debian; it drops that right after opening the tap device.

Known limits: DNS goes through slirp's forwarder to the host's resolvers — if the host
resolves through a loopback stub (``127.0.0.53``) that one port is reachable, by design;
IPv6 is off; addresses the host gains while an action runs are not blocked for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

from .errors import SandboxSetupError

#: The interface slirp4netns creates in the sandbox.
TAP_DEVICE = "tap0"
#: slirp4netns's maximum; a large MTU is what makes it fast.
SLIRP_MTU = 65520
#: Seconds to wait for slirp4netns to say the namespace is configured.
READY_TIMEOUT_SECONDS = 10.0


class SlirpNat:
    """Attaches slirp4netns to sandboxes' network namespaces (see the module docstring).

    Raises SandboxSetupError when ``slirp4netns``, ``ip`` or ``nsenter`` is missing or the worker is not root. Thread-safe: each :meth:`attach` is independent.
    """

    def __init__(
        self, slirp_path: str = "slirp4netns", ip_path: str = "ip", nsenter_path: str = "nsenter",
    ) -> None:
        found = {name: shutil.which(name) for name in (slirp_path, ip_path, nsenter_path)}
        tools = {name: path for name, path in found.items() if path is not None}
        missing = [name for name in found if name not in tools]
        if missing:
            raise SandboxSetupError(f"network=on needs {', '.join(missing)} (Debian: slirp4netns, iproute2, util-linux)")
        if os.geteuid() != 0:
            raise SandboxSetupError("network=on needs a worker running as root (/dev/net/tun is root-only)")
        self._slirp, self._ip, self._nsenter = (tools[name] for name in (slirp_path, ip_path, nsenter_path))

    @contextlib.contextmanager
    def attach(self, pid: int) -> Iterator[None]:
        """Give the network namespace of ``pid`` (a sandbox's init started in a network
        namespace of its own, blocked before the command) outbound connectivity, with the
        host's addresses unreachable, for the context.

        Returns once the namespace is configured; on exit slirp4netns is stopped and reaped.
        Raises SandboxSetupError if it cannot be set up (nothing is left running then).
        """
        blocked = self._host_addresses()
        ready_r, ready_w = os.pipe()
        exit_r, exit_w = os.pipe()
        try:
            # A file, not a pipe: nobody reads slirp's chatter while the action runs, and a
            # full pipe would stall it.
            with tempfile.TemporaryFile() as stderr:
                try:
                    proc = subprocess.Popen(
                        [
                            self._slirp, "--configure", f"--mtu={SLIRP_MTU}", "--disable-host-loopback",
                            "--enable-sandbox", "--enable-seccomp",
                            f"--ready-fd={ready_w}", f"--exit-fd={exit_r}",
                            "--netns-type=path", f"/proc/{pid}/ns/net",
                            TAP_DEVICE,
                        ],
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                        pass_fds=(ready_w, exit_r), env={}, cwd="/",
                    )
                except OSError as e:
                    raise SandboxSetupError(f"cannot start slirp4netns: {e}") from e
                finally:
                    # Only slirp4netns holds these now: EOF on ready_r means it died.
                    os.close(ready_w)
                    os.close(exit_r)
                try:
                    if not _wait_ready(ready_r):
                        proc.kill()
                        proc.wait()
                        stderr.seek(0)
                        lines = stderr.read().decode(errors="replace").strip().splitlines()
                        raise SandboxSetupError(
                            "slirp4netns could not set up the sandbox's network: "
                            + (lines[-1] if lines else "no message")
                        )
                    self._block(pid, blocked)
                    yield
                finally:
                    os.close(exit_w)  # slirp4netns exits when this end closes
                    exit_w = -1
                    _stop(proc)
        finally:
            os.close(ready_r)
            if exit_w != -1:
                os.close(exit_w)

    def _host_addresses(self) -> list[str]:
        """Every local IPv4 address of the worker's namespace, loopback excepted (the
        sandbox's 127.0.0.0/8 is its own)."""
        done = subprocess.run(
            [self._ip, "-j", "-4", "route", "show", "table", "local", "type", "local"],
            capture_output=True, text=True, env={}, cwd="/",
        )
        if done.returncode != 0:
            raise SandboxSetupError(f"cannot list the host's addresses: {done.stderr.strip()}")
        addresses = []
        for route in json.loads(done.stdout or "[]"):
            dst = route.get("dst", "")
            if dst and not dst.startswith("127."):
                addresses.append(dst)
        return addresses

    def _block(self, pid: int, addresses: list[str]) -> None:
        """Unreachable routes to ``addresses`` in ``pid``'s network namespace, and its
        loopback up (nobody else brings it up there)."""
        script = "link set lo up\n" + "".join(f"route add unreachable {address}\n" for address in addresses)
        done = subprocess.run(
            [self._nsenter, f"--net=/proc/{pid}/ns/net", "--", self._ip, "-batch", "-"],
            input=script, capture_output=True, text=True, env={}, cwd="/",
        )
        if done.returncode != 0:
            raise SandboxSetupError(f"cannot fence the host's addresses off the sandbox: {done.stderr.strip()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Reap slirp4netns once its exit descriptor is closed; kill it if it lingers."""
    try:
        proc.wait(timeout=READY_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_ready(fd: int) -> bool:
    """Whether slirp4netns wrote its readiness byte (``False``: it exited first)."""
    readable, _, _ = select.select([fd], [], [], READY_TIMEOUT_SECONDS)
    return bool(readable) and os.read(fd, 1) == b"1"
