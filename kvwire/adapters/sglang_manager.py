"""The kvwire SGLang backend's per-rank transfer engine: ``KvwireKVManager`` (SGLang's ``BaseKVManager``) with
its settings, the bootstrap-mailbox threads, the prefill instance's parallel info and the re-sharding plan
between the two instances' layouts, and the checked parsing of what the mailbox brings.

Owns: ``Settings`` (the environment), ``KvwireTransferError``, ``KvwireKVManager`` (one ``Outbox`` on a
prefill rank, one ``Inbox`` on a decode rank, over ``SglangPools``; mail taken and posted off the engine's
thread; senders and receivers found by room / request id). The request-level classes, the bootstrap server
and the plugin are in ``kvwire.adapters.sglang``; they register with the manager (``add_sender``,
``add_receiver``) and reach it through its public methods only. Must not know: kvwire's internals beyond
``lifecycle``, ``endpoints``, ``sglang_pools``, ``sglang_bootstrap``, ``kvwire.cuda`` and the re-sharding plan
(``codec.reshard``, ``reshard.sub_request_id``); what a sender or receiver does with its mail or its
transfer's end (it calls their ``take_mail`` and ``transfer_ended``).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sglang.srt.disaggregation.base.conn import BaseKVManager

from ..codec.layout import ModelLayout, RequestSpec
from ..codec.reshard import ReshardPlan, plan_reshard
from ..errors import KvwireError, LayoutError, ReshardUnsupported, TransferFailed
from ..reshard import sub_request_id
from .endpoints import split_endpoint
from .lifecycle import Inbox, Outbox, tail_parity_setting
from .sglang_bootstrap import MailboxClient
from .sglang_pools import SglangPools, unsliceable_tensors

if TYPE_CHECKING:
    from .sglang import KvwireKVReceiver, KvwireKVSender

log = logging.getLogger("kvwire.adapters.sglang")

BACKEND = "kvwire"
MAX_INDICES = 1 << 22  # pages or slots one request may name in the mailbox (a 4M-token prompt at page size 1)


class KvwireTransferError(TransferFailed):
    """What ``failure_exception`` raises: SGLang reads ``failure_reason`` and ``is_from_another_rank``."""

    def __init__(self, bootstrap_room: int, failure_reason: str) -> None:
        super().__init__(failure_reason)
        self.bootstrap_room = bootstrap_room
        self.failure_reason = failure_reason
        self.is_from_another_rank = False

    def __str__(self) -> str:
        return f"KvwireTransferError(bootstrap_room={self.bootstrap_room}): {self.failure_reason}"


class Settings:
    """The backend's configuration, from the environment (SGLang gives a backend no options of its own)."""

    def __init__(self, env: Any = None) -> None:
        env = os.environ if env is None else env
        key = env.get("KVWIRE_KEY")
        self.key: bytes | None = key.encode() if key else None
        self.lanes = int(env.get("KVWIRE_LANES", "4"))
        self.timeout = float(env.get("KVWIRE_TIMEOUT", "300"))
        self.host: str | None = env.get("KVWIRE_HOST") or None
        self.port = int(env.get("KVWIRE_PORT", "0"))
        self.pool_bytes = int(env.get("KVWIRE_POOL_BYTES", str(4 << 30)))
        if self.lanes < 1 or self.timeout <= 0 or self.pool_bytes <= 0:
            raise LayoutError("KVWIRE_LANES, KVWIRE_TIMEOUT and KVWIRE_POOL_BYTES must be positive")
        self.tail_parity = tail_parity_setting(env.get("KVWIRE_TAIL_PARITY"), "KVWIRE_TAIL_PARITY")

    def need_key(self) -> bytes:
        """The key; the bootstrap mailbox (on the network) and the sessions are authenticated with it."""
        if not self.key:
            raise LayoutError("KVWIRE_KEY must be set (the same on both instances): it authenticates the "
                              "bootstrap mailbox and the kvwire sessions")
        return self.key


def _split_addr(addr: str) -> tuple[str, int]:
    """SGLang's ``bootstrap_addr``: ``f"{bootstrap_host}:{port}"``, the host bare even when it is an IPv6
    literal (the last colon splits), or bracketed; an empty host is this host (``127.0.0.1``)."""
    addr = str(addr)
    if addr.startswith(":") and ":" not in addr[1:]:
        addr = "127.0.0.1" + addr
    return split_endpoint(addr, what="bootstrap_addr", bare_ipv6=True)


def _mode(disaggregation_mode: Any) -> str:
    return str(getattr(disaggregation_mode, "value", disaggregation_mode))


def checked_indices(v: Any, what: str) -> list[int]:
    """A list of non-negative ints from the engine or the mailbox (untrusted there: checked, bounded)."""
    if v is None:
        raise KvwireError(f"{what}: missing")
    out = [int(x) for x in (v.tolist() if hasattr(v, "tolist") else v)]
    if len(out) > MAX_INDICES or any(x < 0 for x in out):
        raise KvwireError(f"{what}: {len(out)} indices, or a negative one")
    return out


class _PrefillInfo:
    """What SGLang's decode queue reads of a prefill instance (``prefill_info_table``), and its layout (rank
    0's, the other ranks' differ only in ``tp_rank``) for planning a re-sharding."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.dp_size = max(1, int(d.get("dp_size", 1)))
        self.tp_size = int(d.get("tp_size", 1))
        self.attn_tp_size = int(d.get("attn_tp_size", self.tp_size))
        self.follow_bootstrap_room = True
        self.layout: ModelLayout | None = None
        self.layout_error = ""
        if d.get("layout") is not None:
            try:
                self.layout = ModelLayout.from_dict(d["layout"])
            except (LayoutError, TypeError, ValueError) as e:
                self.layout_error = f"prefill published a malformed layout: {e}"


def _attn_tp(server_args: Any) -> int:
    """SGLang's attention-TP size: ``tp_size``, divided by ``dp_size`` under DP attention."""
    tp = int(getattr(server_args, "tp_size", 1) or 1)
    if getattr(server_args, "enable_dp_attention", False):
        tp //= max(1, int(getattr(server_args, "dp_size", 1) or 1))
    return max(1, tp)


def plan_between(prefill: ModelLayout, decode: ModelLayout, heads: dict[str, int]) -> ReshardPlan:
    """The re-sharding plan between two SGLang ranks' layouts; ``ReshardUnsupported`` when a buffer cannot
    be sliced (no SGLang metadata for it) or no plan maps the pair."""
    for side, layout in (("prefill", prefill), ("decode", decode)):
        raw = unsliceable_tensors(layout)
        if raw:
            raise ReshardUnsupported(f"{side} buffers {raw[:4]} carry no TP slicing metadata: they cannot be "
                                     f"re-sharded (prefill TP {prefill.tp_size}, decode TP {decode.tp_size})")
    return plan_reshard(prefill, decode, heads=heads)


class KvwireKVManager(BaseKVManager):
    """One rank's transfer engine: an ``Outbox`` (prefill) or an ``Inbox`` (decode) over its own pools."""

    def __init__(self, args: Any, disaggregation_mode: Any, server_args: Any,
                 is_mla_backend: bool | None = False) -> None:
        from ..cuda import PinnedPool, Stager, Unstager

        self.kv_args = args
        self.server_args = server_args
        self.mode = _mode(disaggregation_mode)
        self.settings = Settings()
        key = self.settings.need_key()  # before anything starts
        if int(getattr(server_args, "pp_size", 1) or 1) > 1:
            raise LayoutError("the kvwire backend does not support pipeline-parallel instances (pp_size > 1)")
        self.rank = int(getattr(args, "engine_rank", 0) or 0)
        self.dp_rank = int(getattr(args, "system_dp_rank", 0) or 0)
        self.tp_size = _attn_tp(server_args)
        self.tp_rank = self.rank % self.tp_size
        self.pools = SglangPools(args, is_mla=bool(is_mla_backend), device=self._device(args),
                                 tp_size=self.tp_size, tp_rank=self.tp_rank)
        self.layout = self.pools.layout
        self.prefill_info_table: dict[str, _PrefillInfo] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._senders: dict[int, KvwireKVSender] = {}
        self._receivers: dict[str, KvwireKVReceiver] = {}
        self._unclaimed: dict[int, tuple[float, list[dict[str, Any]]]] = {}  # mail for rooms without a sender
        self.outbox: Outbox | None = None
        self.inbox: Inbox | None = None
        pool = PinnedPool(self.settings.pool_bytes, backend="torch")
        s = self.settings
        if self.mode == "prefill":
            self.outbox = Outbox(Stager(self.pools.cache, pool), timeout=s.timeout, lanes=s.lanes, key=s.key,
                                 tail_parity=s.tail_parity)
            host = str(getattr(server_args, "dist_init_addr", None) or "").rpartition(":")[0] \
                or str(getattr(server_args, "host", "127.0.0.1"))
            host = host.strip("[]")
            host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
            self.mailbox = MailboxClient(host, int(getattr(server_args, "disaggregation_bootstrap_port", 8998)), key)
            self._registered = threading.Event()
            self._thread = threading.Thread(target=self._take_mail, name="kvwire-sglang-mail", daemon=True)
            self._thread.start()  # registers with the bootstrap server first (it may start after us)
        elif self.mode == "decode":
            bind = s.host or str(getattr(server_args, "host", "127.0.0.1") or "127.0.0.1")
            self.inbox = Inbox(Unstager(self.pools.cache, pool), timeout=s.timeout, host=bind, port=s.port,
                               key=s.key)
            adv = s.host or bind
            if adv in ("0.0.0.0", "::"):  # this host's first address (of the family listened on)
                family = socket.AF_INET if adv == "0.0.0.0" else socket.AF_UNSPEC
                adv = str(socket.getaddrinfo(socket.gethostname(), None, family, socket.SOCK_STREAM)[0][4][0])
            self.endpoint = (adv, self.inbox.address[1])
            self._posts: queue.Queue[
                tuple[MailboxClient, int, int, dict[str, Any], Callable[[str], None]] | None] = queue.Queue()
            self._thread = threading.Thread(target=self._post_mail, name="kvwire-sglang-post", daemon=True)
            self._thread.start()
        else:
            raise LayoutError(f"disaggregation mode {self.mode!r}: kvwire serves 'prefill' and 'decode'")

    @staticmethod
    def _device(args: Any) -> str:
        forced = os.environ.get("KVWIRE_DEVICE")
        if forced:
            return forced
        import torch

        return f"cuda:{int(getattr(args, 'gpu_id', 0) or 0)}" if torch.cuda.is_available() else "cpu"

    def register_to_bootstrap(self) -> None:
        """Prefill: tell the bootstrap mailbox this instance's parallel layout (what decode's queue asks for
        before it creates receivers). One try; the mail thread retries until it succeeds."""
        if self.mode != "prefill" or self._registered.is_set():
            return
        if self.rank == 0 and self.dp_rank == 0:
            sa = self.server_args
            dp = int(getattr(sa, "dp_size", 1) or 1) if getattr(sa, "enable_dp_attention", False) else 1
            self.mailbox.put_info({"dp_size": dp, "tp_size": int(getattr(sa, "tp_size", 1) or 1),
                                   "attn_tp_size": self.tp_size, "backend": BACKEND,
                                   "layout": self.layout.to_dict()})
        self._registered.set()

    # ---- decode: what SGLang's decode queue asks of a manager
    def try_ensure_parallel_info(self, bootstrap_addr: str) -> bool:
        if bootstrap_addr in self.prefill_info_table:
            return True
        try:
            info = MailboxClient(*_split_addr(bootstrap_addr), self.settings.need_key(), timeout=2.0).info()
        except (OSError, ValueError) as e:
            log.debug("kvwire: no parallel info from %s yet: %s", bootstrap_addr, e)
            return False
        self.prefill_info_table[bootstrap_addr] = _PrefillInfo(info)
        return True

    # ---- prefill mail
    def _take_mail(self) -> None:
        while not self._closed.is_set():
            try:
                self.register_to_bootstrap()
            except OSError as e:  # the bootstrap server starts beside the schedulers, maybe after them
                log.debug("kvwire: bootstrap not up yet: %s", e)
                self._closed.wait(0.2)
                continue
            try:
                msgs = self.mailbox.take(self.dp_rank, self.tp_rank, wait=0.5)  # returns at once when mail is in
            except (OSError, ValueError) as e:
                log.debug("kvwire: mailbox: %s", e)
                msgs = []
                self._closed.wait(0.2)
            for m in msgs:
                self._deliver(m)
            self._expire_unclaimed()

    def _deliver(self, m: Any) -> None:
        if not isinstance(m, dict) or not isinstance(m.get("room"), int):
            log.warning("kvwire: malformed bootstrap message dropped")
            return
        with self._lock:
            sender = self._senders.get(m["room"])
            if sender is None:
                held = self._unclaimed.get(m["room"])
                if held is not None and len(held[1]) < 1024:  # one per decode rank that feeds on this rank
                    held[1].append(m)
                elif held is None and len(self._unclaimed) < 100_000:
                    self._unclaimed[m["room"]] = (time.monotonic(), [m])
                return
        sender.take_mail(m)

    def _expire_unclaimed(self) -> None:
        now = time.monotonic()
        with self._lock:
            for room in [r for r, (t, _m) in self._unclaimed.items() if now - t > self.settings.timeout]:
                del self._unclaimed[room]

    def add_sender(self, sender: KvwireKVSender) -> None:
        """Prefill: ``sender`` takes its room's mail from now on, and what came for it before (``take_mail``)."""
        with self._lock:
            self._senders[sender.room] = sender
            early = self._unclaimed.pop(sender.room, None)
        for m in early[1] if early is not None else []:
            sender.take_mail(m)

    def drop_sender(self, sender: KvwireKVSender) -> None:
        with self._lock:
            if self._senders.get(sender.room) is sender:
                del self._senders[sender.room]

    def add_receiver(self, receiver: KvwireKVReceiver) -> None:
        """Decode: ``receiver`` (its request id ``rid``) is told how its transfer ended (``poll_inbox``)."""
        with self._lock:
            self._receivers[receiver.rid] = receiver

    def drop_receiver(self, receiver: KvwireKVReceiver) -> None:
        with self._lock:
            if self._receivers.get(receiver.rid) is receiver:
                del self._receivers[receiver.rid]

    def tell_decode(self, dest: dict[str, Any], reason: str, plan: ReshardPlan | None = None) -> None:
        """A request that fails before its transfer began: open the transfer decode expects (with ``plan``:
        this rank's slice transfer to that decode rank) and cancel it at once, so decode fails with
        ``reason`` now rather than at its timeout. Off the engine's thread."""

        def run() -> None:
            try:
                host, port = split_endpoint(dest.get("endpoint"), what="decode's endpoint")
                pages = checked_indices(dest.get("kv"), "decode's kv pages")
                counts = self.pools.state_counts([None if x is None else checked_indices(x, "state")
                                                  for x in (dest.get("state") or [])])
                request = self.pools.request(str(dest["rid"]), len(pages), counts)
                layout = self.layout
                if plan is not None:
                    d = int(dest["rank"])
                    if d not in plan.targets(self.tp_rank):
                        return  # that decode rank expects nothing from this one
                    layout = plan.slice_layout(self.tp_rank, d)
                    request = RequestSpec(sub_request_id(request.request_id, self.tp_rank, d), request.num_tokens,
                                          request.state_position, dict(request.prefix_hit))
                assert self.outbox is not None
                out = self.outbox.session(host, port).send(layout, request, timeout=10)
                out.cancel(reason)
            except Exception as e:  # noqa: BLE001 - decode still fails, at its own timeout
                log.debug("kvwire: could not tell decode of room %s: %s", dest.get("room"), e)

        threading.Thread(target=run, name="kvwire-sglang-cancel", daemon=True).start()

    def poll_outbox(self) -> None:
        """Prefill: tell each registered sender whose transfer ended (``transfer_ended``)."""
        assert self.outbox is not None
        for e in self.outbox.poll():
            with self._lock:
                sender = self._senders.get(int(e.key))
            if sender is not None:
                sender.transfer_ended(e)

    # ---- decode mail
    def _post_mail(self) -> None:
        while True:
            item = self._posts.get()
            if item is None:
                return
            client, dp, rank, msg, on_error = item
            try:
                client.post(dp, rank, msg)
            except (OSError, ValueError) as e:
                on_error(f"posting to the prefill bootstrap {client.base}: {e}")

    def post_to_prefill(self, bootstrap_addr: str, dp: int, msg: dict[str, Any], on_error: Callable[[str], None],
              rank: int | None = None) -> None:
        """Queue ``msg`` for prefill attention-TP rank ``rank`` (default: this rank's own) of DP rank ``dp``
        (mail is addressed by attention-TP rank: SGLang's ``engine_rank`` modulo ``attn_tp_size``)."""
        client = MailboxClient(*_split_addr(bootstrap_addr), self.settings.need_key(),
                               timeout=min(10.0, self.settings.timeout))
        self._posts.put((client, dp, self.tp_rank if rank is None else rank, msg, on_error))

    def plan_from(self, bootstrap_addr: str) -> ReshardPlan | None:
        """Decode: the re-sharding plan from the prefill instance at ``bootstrap_addr`` to this rank's
        layout, or ``None`` when both run the same attention TP. Raises ``KvwireError`` (typed: the
        reason) when the TPs differ and no plan bridges them. Without the prefill's parallel info (SGLang's
        decode queue fetches it before it creates receivers) it assumes equal TP: a transfer between
        different TP layouts is then refused by the layout check (TP is in it), never misread."""
        if bootstrap_addr not in self.prefill_info_table and not self.try_ensure_parallel_info(bootstrap_addr):
            return None
        info = self.prefill_info_table[bootstrap_addr]
        if info.attn_tp_size == self.tp_size:
            return None
        if info.layout is None:
            raise ReshardUnsupported(info.layout_error or
                                     f"prefill runs attention TP {info.attn_tp_size}, decode {self.tp_size}, and "
                                     f"prefill published no layout to re-shard from")
        if info.layout.tp_size != info.attn_tp_size:
            raise ReshardUnsupported(f"prefill's layout says TP {info.layout.tp_size}, its info "
                                     f"{info.attn_tp_size}")
        return plan_between(info.layout, self.layout, self.pools.heads)

    def poll_inbox(self) -> None:
        """Decode: tell each registered receiver whose transfer ended (``transfer_ended``)."""
        assert self.inbox is not None
        for e in self.inbox.poll():
            with self._lock:
                receiver = self._receivers.get(e.key)
            if receiver is not None:
                receiver.transfer_ended(e)

    def close(self) -> None:
        """Cancel what is in flight (every lease ends), stop the threads and the receiver."""
        self._closed.set()
        if self.outbox is not None:
            for e in self.outbox.close():
                with self._lock:
                    sender = self._senders.get(int(e.key))
                if sender is not None:
                    sender.transfer_ended(e)
        if self.inbox is not None:
            self._posts.put(None)
            for e in self.inbox.close():
                with self._lock:
                    receiver = self._receivers.get(e.key)
                if receiver is not None:
                    receiver.transfer_ended(e)
        self._thread.join(timeout=5)


__all__ = ["BACKEND", "MAX_INDICES", "KvwireKVManager", "KvwireTransferError", "Settings", "checked_indices",
           "plan_between"]
