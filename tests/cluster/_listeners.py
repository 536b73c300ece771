"""Listening TCP sockets on this machine, by process, read from /proc (Linux; no psutil)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

_LISTEN = "0A"  # the TCP state code of a listening socket in /proc/net/tcp*


@dataclass(frozen=True)
class Listener:
    address: str  # "0.0.0.0", "127.0.0.1", "::", "::1", ...
    port: int
    pid: int | None
    command: str

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback


def _address(hex_ip: str) -> str:
    raw = bytes.fromhex(hex_ip)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # IPv6: four 32-bit words, each in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    addr = ipaddress.IPv6Address(words)
    return str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)


def _socket_owners() -> dict[int, int]:
    """Socket inode -> the pid holding it."""
    owners: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    owners[int(target[8:-1])] = int(pid)
        except OSError:
            continue  # gone, or not ours to read
    return owners


def _command(pid: int | None) -> str:
    if pid is None:
        return "?"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            line = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
        if line:
            return line
        # A process on its way out has an empty command line (CI saw one); its name remains.
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


def listeners() -> list[Listener]:
    owners = _socket_owners()
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] != _LISTEN:
                continue
            hex_ip, hex_port = cols[1].split(":")
            pid = owners.get(int(cols[9]))
            out.append(Listener(_address(hex_ip), int(hex_port, 16), pid, _command(pid)))
    return out


def descendants(root: int) -> set[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(pid))
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    return seen
