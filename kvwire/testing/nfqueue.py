"""Netfilter NFQUEUE over a raw netlink socket, in pure Python (no libnetfilter_queue, no compiler).

Owns: the ``nfnetlink_queue`` wire format — config messages (bind a queue, copy mode and range, queue
length, flags), packet notifications (only the packet id and length are read) and verdicts, single
and batched (``NFQNL_MSG_VERDICT_BATCH`` releases every queued packet up to an id). Packets stay in
the kernel; only a few header bytes are copied to us. Must not know: link models, timing, namespaces.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from ..errors import KvwireError

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33

NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4

NFNL_SUBSYS_QUEUE = 3
MSG_PACKET = NFNL_SUBSYS_QUEUE << 8 | 0
MSG_VERDICT = NFNL_SUBSYS_QUEUE << 8 | 1
MSG_CONFIG = NFNL_SUBSYS_QUEUE << 8 | 2
MSG_VERDICT_BATCH = NFNL_SUBSYS_QUEUE << 8 | 3

CFG_CMD, CFG_PARAMS, CFG_QUEUE_MAXLEN, CFG_MASK, CFG_FLAGS = 1, 2, 3, 4, 5
CMD_BIND, CMD_UNBIND = 1, 2
COPY_NONE, COPY_META, COPY_PACKET = 0, 1, 2
F_FAIL_OPEN, F_CONNTRACK, F_GSO = 1, 2, 4

A_PACKET_HDR, A_VERDICT_HDR, A_PAYLOAD, A_CAP_LEN = 1, 2, 10, 13
NF_DROP, NF_ACCEPT = 0, 1

_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
_BE32 = struct.Struct("!I")
_NFGEN = struct.Struct("!BBH")  # family, version, res_id (big-endian)


class NfQueueError(KvwireError):
    """The kernel refused an NFQUEUE request (no nfnetlink_queue support, queue already bound, ...)."""


def _attr(kind: int, data: bytes) -> bytes:
    n = _NLATTR.size + len(data)
    return _NLATTR.pack(n, kind) + data + b"\0" * (-n % 4)


def _msg(kind: int, flags: int, seq: int, queue: int, attrs: bytes) -> bytes:
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, queue) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def verdict(queue: int, packet_id: int, accept: bool) -> bytes:
    """A verdict for one packet."""
    hdr = struct.pack("!II", NF_ACCEPT if accept else NF_DROP, packet_id)
    return _msg(MSG_VERDICT, NLM_F_REQUEST, 0, queue, _attr(A_VERDICT_HDR, hdr))


def verdict_batch(queue: int, up_to_id: int, accept: bool = True) -> bytes:
    """One verdict for every packet of ``queue`` with id <= ``up_to_id`` still waiting."""
    hdr = struct.pack("!II", NF_ACCEPT if accept else NF_DROP, up_to_id)
    return _msg(MSG_VERDICT_BATCH, NLM_F_REQUEST, 0, queue, _attr(A_VERDICT_HDR, hdr))


def parse_packets(buf: bytes | bytearray | memoryview, n: int) -> list[tuple[int, int, int]]:
    """``(queue, packet id, packet length)`` of each packet notification in ``buf[:n]``; the length is
    the whole packet's (L3), even when only a few bytes were copied. Other messages are skipped."""
    out = []
    off = 0
    unpack_hdr, unpack_attr, unpack_be32 = _NLMSGHDR.unpack_from, _NLATTR.unpack_from, _BE32.unpack_from
    while off + 16 <= n:
        mlen, mtype = unpack_hdr(buf, off)[:2]
        if mlen < 16 or off + mlen > n:
            break
        if mtype == MSG_PACKET:
            queue = (buf[off + 18] << 8) | buf[off + 19]
            pid = length = caplen = -1
            a = off + 20
            end = off + mlen
            while a + 4 <= end:
                alen, atype = unpack_attr(buf, a)
                if alen < 4:
                    break
                atype &= 0x3FFF
                if atype == A_PACKET_HDR:
                    pid = unpack_be32(buf, a + 4)[0]
                elif atype == A_CAP_LEN:
                    caplen = unpack_be32(buf, a + 4)[0]
                elif atype == A_PAYLOAD:
                    length = alen - 4
                a += (alen + 3) & ~3
            if pid >= 0:
                out.append((queue, pid, caplen if caplen >= 0 else max(length, 0)))
        off += (mlen + 3) & ~3
    return out


class NfQueueSocket:
    """A netlink socket bound to one or more NFQUEUE numbers of the current network namespace."""

    def __init__(self, rcvbuf: int = 32 << 20) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 0))
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        except BaseException:
            self.sock.close()
            raise
        self._seq = 0
        self.queues: list[int] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def bind_queue(self, queue: int, copy_range: int = 40, maxlen: int = 1 << 16, gso: bool = False) -> None:
        """Take packets of ``queue``: copy ``copy_range`` bytes of each, hold at most ``maxlen``.
        ``gso``: take GSO super-packets whole instead of having the kernel segment them."""
        self._request(queue, _attr(CFG_CMD, struct.pack("!BxH", CMD_BIND, socket.AF_INET)))
        self.queues.append(queue)
        self._request(queue, _attr(CFG_PARAMS, struct.pack("!IB", copy_range, COPY_PACKET))
                      + _attr(CFG_QUEUE_MAXLEN, _BE32.pack(maxlen)))
        flags = _attr(CFG_FLAGS, _BE32.pack(F_GSO if gso else 0)) + _attr(CFG_MASK, _BE32.pack(F_GSO))
        self._request(queue, flags)

    def _request(self, queue: int, attrs: bytes) -> None:
        self._seq += 1
        self.sock.send(_msg(MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, self._seq, queue, attrs))
        buf = bytearray(8192)
        while True:  # packets may already be arriving on other queues: skip them (they will time out)
            n = self.sock.recv_into(buf)
            off = 0
            while off + 16 <= n:
                mlen, mtype, _, seq, _ = _NLMSGHDR.unpack_from(buf, off)
                if mtype == NLMSG_ERROR and seq == self._seq:
                    err = -struct.unpack_from("=i", buf, off + 16)[0]
                    if err:
                        raise NfQueueError(f"NFQUEUE config for queue {queue} refused: {os.strerror(err)}")
                    return
                off += max(16, (mlen + 3) & ~3)

    def recv_into(self, buf: bytearray) -> int:
        """Non-blocking read of one netlink datagram; 0 when nothing is waiting."""
        try:
            return self.sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno == errno.ENOBUFS:  # notifications were lost; their packets were dropped
                return 0
            raise

    def send(self, messages: bytes) -> None:
        """Send one or more concatenated verdict messages in one syscall."""
        self.sock.sendall(messages)

    def close(self) -> None:
        for q in self.queues:
            try:
                self.sock.send(_msg(MSG_CONFIG, NLM_F_REQUEST, 0, q,
                                    _attr(CFG_CMD, struct.pack("!BxH", CMD_UNBIND, socket.AF_INET))))
            except OSError:
                pass
        self.queues.clear()
        self.sock.close()
