"""Two Linux network namespaces joined by a veth pair, each end shaped by a token bucket: a slow link on one machine.

bench/wan_diloco.py runs one peer in each namespace. The addresses (10.77.0.1 and 10.77.0.2 by
default) belong to the namespaces alone: nothing is routed off the machine. Each end's egress goes
through `tc ... tbf` at the given rate (this kernel has no netem, so there is no added delay or
loss: the link is only narrow). Byte counters are the veth ends' own (`statistics/tx_bytes`), read
inside each namespace. Needs root, Linux and iproute2's `ip` and `tc`; `unavailable()` says why not.

    with VethPair(rate="50mbit") as link:
        subprocess.run([*link.exec_in(0), "python", ...])   # a process in namespace 0
        link.tx_bytes(0)
"""

import os
import shutil
import subprocess
import sys

SUBNET = "10.77.0"


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "network namespaces and tc need root (run with sudo)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"iproute2's {' and '.join(missing)} not found on PATH"
    return None


def _run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


class VethPair:
    """Namespaces `<prefix>0` and `<prefix>1`, each holding one end of a veth pair (`veth0`, `veth1`)."""

    def __init__(self, rate: str = "50mbit", burst: str = "256kbit", latency: str = "50ms",
                 prefix: str | None = None):
        self.rate, self.burst, self.latency = rate, burst, latency
        self.prefix = prefix or f"cmwan{os.getpid()}-"  # one set per bench process: no clash with another run
        self.namespaces = [f"{self.prefix}0", f"{self.prefix}1"]
        self.interfaces = ["veth0", "veth1"]
        self.addresses = [f"{SUBNET}.1", f"{SUBNET}.2"]

    def __enter__(self) -> "VethPair":
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def create(self) -> None:
        for ns in self.namespaces:
            _run("ip", "netns", "add", ns)
        # made in the first namespace, the second end then moved: the root namespace never holds either
        _run("ip", "-n", self.namespaces[0], "link", "add", self.interfaces[0], "type", "veth",
             "peer", "name", self.interfaces[1], "netns", self.namespaces[1])
        for ns, interface, address in zip(self.namespaces, self.interfaces, self.addresses, strict=True):
            _run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", interface)
            _run("ip", "-n", ns, "link", "set", interface, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", interface, "root", "tbf",
                 "rate", self.rate, "burst", self.burst, "latency", self.latency)

    def close(self) -> None:
        """Delete both namespaces (their veth ends go with them); quiet about ones already gone."""
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)

    def exec_in(self, index: int) -> list[str]:
        """The command prefix that runs a program inside namespace `index`."""
        return ["ip", "netns", "exec", self.namespaces[index]]

    def counter(self, index: int, name: str) -> int:
        """A statistics counter (`tx_bytes`, `rx_bytes`, ...) of namespace `index`'s veth end."""
        path = f"/sys/class/net/{self.interfaces[index]}/statistics/{name}"
        return int(_run(*self.exec_in(index), "cat", path))

    def tx_bytes(self, index: int) -> int:
        return self.counter(index, "tx_bytes")

    def measure_mbit(self, megabytes: int = 4) -> float:
        """Mbit/s of one TCP stream from namespace 0 to namespace 1: the shaping, checked before anyone trusts it."""
        server_code = ("import socket, sys\n"
                       "s = socket.create_server((sys.argv[1], 0)); print(s.getsockname()[1], flush=True)\n"
                       "c, _ = s.accept()\n"
                       "while c.recv(1 << 16): pass\n"
                       "c.sendall(b'k'); c.close()\n")
        client_code = ("import socket, sys, time\n"
                       "c = socket.create_connection((sys.argv[1], int(sys.argv[2]))); t = time.perf_counter()\n"
                       "c.sendall(bytes(int(sys.argv[3]))); c.shutdown(socket.SHUT_WR); c.recv(1)\n"
                       "print(time.perf_counter() - t)\n")
        server = subprocess.Popen([*self.exec_in(1), sys.executable, "-c", server_code, self.addresses[1]],
                                  stdout=subprocess.PIPE, text=True)
        try:
            port = server.stdout.readline().strip()  # the server is listening once it has printed its port
            seconds = float(_run(*self.exec_in(0), sys.executable, "-c", client_code, self.addresses[1], port,
                                 str(megabytes * 1_000_000)))
        finally:
            server.kill()
            server.wait()
        return megabytes * 8 / seconds
