"""SGLang PD-disaggregation transfer backend over kvwire: attention KV pages, Mamba/GDN state slots, SWA
window pages and the aux (first token, logprobs) rows, from the prefill instance's pools into the decode's.

Owns: ``KvwireKVManager``, ``KvwireKVSender``, ``KvwireKVReceiver``, ``KvwireKVBootstrapServer`` (SGLang's
``BaseKVManager``/``BaseKVSender``/``BaseKVReceiver``/``BaseKVBootstrapServer``, the ``KVPoll`` lifecycle) and
``register``, the ``sglang.srt.plugins`` entry point that makes ``--disaggregation-transfer-backend kvwire``
choose them (a choice added to SGLang's list, ``TransferBackend`` extended by a class-REPLACE hook, and an
AROUND hook on ``get_kv_class``). Enable with, on both instances::

    pip install -e .              # into SGLang's environment: the entry point (SGLANG_PLUGINS must name it)
    export KVWIRE_KEY=...         # required, the same on both: authenticates the sessions and the bootstrap mailbox
    python -m sglang.launch_server ... --disaggregation-mode prefill --disaggregation-transfer-backend kvwire

Call order served (SGLang 0.5.23): decode allocates first (the N convention): ``KVReceiver.init`` then,
once its pages, state slots and aux row are allocated, ``send_metadata`` posts them with its kvwire endpoint
to the prefill instance's bootstrap mailbox and expects the transfer; prefill ``KVSender.poll`` says
``Bootstrapping`` until that arrived, then ``WaitingForInput``; ``init(num_pages, aux_index)``, ``send`` per
chunk (pages accumulate; the last chunk brings the state indices) starts one kvwire transfer of every buffer,
layer by layer; ``poll`` says ``Transferring`` and then ``Success`` or ``Failed`` on both sides, with the
reason from ``failure_exception``. Every request ends: a destination that never comes, a transfer that never
starts or never ends fails at ``KVWIRE_TIMEOUT``; ``abort`` cancels (the other side learns through kvwire's
cancel, or through the mailbox before the transfer started). Leases (``lifecycle``) end only once no copy
touches the pages or slots; SGLang frees them after the terminal poll.

Settings (environment, both instances): ``KVWIRE_KEY``, ``KVWIRE_LANES`` (4), ``KVWIRE_TIMEOUT`` (300 s),
``KVWIRE_HOST`` (the decode address prefill dials; default SGLang's ``--host``, or this host's name when
that is a wildcard), ``KVWIRE_PORT`` (0: any), ``KVWIRE_POOL_BYTES`` (pinned staging, 4 GiB).

Prefill and decode at different attention TP (issue 15): prefill rank 0 publishes its layout with its
parallel info; a decode rank whose prefill instance runs another TP plans the re-sharding
(``kvwire.codec.reshard``: which slices of which prefill ranks' buffers it needs), ``expect``s one transfer
from each contributing prefill rank (``Inbox.expect_resharded``) and then posts its destination, with its
layout, to every prefill rank SGLang pairs it with (``_resolve_rank_mapping``: ``[d*k, (d+1)*k)`` when
prefill TP is ``k`` times decode's, ``d // k`` when decode's is ``k`` times prefill's). A prefill rank waits
for the destinations of every decode rank it feeds (SGLang's ``required_dst_info_num``), then sends each
only its slices (``Outbox.begin_resharded``). A decode rank's request succeeds once every contributing prefill
rank's slices are in and verified; one that fails fails it with a reason naming that prefill rank.

Not supported (a clear ``Failed``, or ``LayoutError`` at start): decode radix-cache prefix hits, host
destinations, state types other than ``mamba`` and ``swa``, re-sharding a buffer SGLang gives no slicing
metadata for (``SglangPools.unsliceable``), pipeline-parallel instances. This module imports SGLang; nothing in
``kvwire`` imports this module. Must not know: kvwire's internals beyond ``lifecycle``, ``sglang_pools``,
``sglang_bootstrap``, ``kvwire.cuda`` and the re-sharding plan (``codec.reshard``, ``reshard.sub_request_id``).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from sglang.srt.disaggregation.base.conn import (
    BaseKVBootstrapServer,
    BaseKVManager,
    BaseKVReceiver,
    BaseKVSender,
    KVPoll,
    KVTransferDestination,
    KVTransferMetric,
)

from ..codec.layout import ModelLayout, RequestSpec
from ..codec.reshard import ReshardPlan, plan_reshard
from ..codec.transfer import State
from ..errors import KvwireError, LayoutError, ReshardUnsupported, TransferFailed
from ..reshard import sub_request_id
from .lifecycle import Ended, Inbox, Outbox, Receiving, Sending
from .sglang_bootstrap import MailboxClient, MailboxServer
from .sglang_pools import SglangPools, unsliceable_tensors

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

    def need_key(self) -> bytes:
        """The key; the bootstrap mailbox (on the network) and the sessions are authenticated with it."""
        if not self.key:
            raise LayoutError("KVWIRE_KEY must be set (the same on both instances): it authenticates the "
                              "bootstrap mailbox and the kvwire sessions")
        return self.key


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = str(addr).rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def _mode(disaggregation_mode: Any) -> str:
    return str(getattr(disaggregation_mode, "value", disaggregation_mode))


def _indices(v: Any, what: str) -> list[int]:
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


def _plan(prefill: ModelLayout, decode: ModelLayout, heads: dict[str, int]) -> ReshardPlan:
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
            self.outbox = Outbox(Stager(self.pools.cache, pool), timeout=s.timeout, lanes=s.lanes, key=s.key)
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
                msgs = self.mailbox.take(self.dp_rank, self.rank, wait=0.5)  # returns at once when mail is in
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
        sender._mail(m)

    def _expire_unclaimed(self) -> None:
        now = time.monotonic()
        with self._lock:
            for room in [r for r, (t, _m) in self._unclaimed.items() if now - t > self.settings.timeout]:
                del self._unclaimed[room]

    def _add_sender(self, sender: KvwireKVSender) -> None:
        with self._lock:
            self._senders[sender.room] = sender
            early = self._unclaimed.pop(sender.room, None)
        for m in early[1] if early is not None else []:
            sender._mail(m)

    def _drop_sender(self, sender: KvwireKVSender) -> None:
        with self._lock:
            if self._senders.get(sender.room) is sender:
                del self._senders[sender.room]

    def _tell_decode(self, dest: dict[str, Any], reason: str, plan: ReshardPlan | None = None) -> None:
        """A request that fails before its transfer began: open the transfer decode expects (with ``plan``:
        this rank's slice transfer to that decode rank) and cancel it at once, so decode fails with
        ``reason`` now rather than at its timeout. Off the engine's thread."""

        def run() -> None:
            try:
                host, port = dest["endpoint"]
                pages = _indices(dest.get("kv"), "decode's kv pages")
                counts = self.pools.state_counts([None if x is None else _indices(x, "state")
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
                out = self.outbox.session(str(host), int(port)).send(layout, request, timeout=10)
                out.cancel(reason)
            except Exception as e:  # noqa: BLE001 - decode still fails, at its own timeout
                log.debug("kvwire: could not tell decode of room %s: %s", dest.get("room"), e)

        threading.Thread(target=run, name="kvwire-sglang-cancel", daemon=True).start()

    def _poll_outbox(self) -> None:
        assert self.outbox is not None
        for e in self.outbox.poll():
            with self._lock:
                sender = self._senders.get(int(e.key))
            if sender is not None:
                sender._ended(e)

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

    def _post(self, bootstrap_addr: str, dp: int, msg: dict[str, Any], on_error: Callable[[str], None],
              rank: int | None = None) -> None:
        """Queue ``msg`` for prefill rank ``rank`` (default: this rank's own number) of DP rank ``dp``."""
        client = MailboxClient(*_split_addr(bootstrap_addr), self.settings.need_key(),
                               timeout=min(10.0, self.settings.timeout))
        self._posts.put((client, dp, self.rank if rank is None else rank, msg, on_error))

    def plan_from(self, bootstrap_addr: str) -> ReshardPlan | None:
        """Decode: the re-sharding plan from the prefill instance at ``bootstrap_addr`` to this rank's
        layout, or ``None`` when both run the same attention TP. Raises ``KvwireError`` (typed: the
        reason) when the TPs differ and no plan bridges them."""
        if bootstrap_addr not in self.prefill_info_table and not self.try_ensure_parallel_info(bootstrap_addr):
            raise KvwireError(f"no parallel info from the prefill bootstrap {bootstrap_addr}")
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
        return _plan(info.layout, self.layout, self.pools.heads)

    def _poll_inbox(self) -> None:
        assert self.inbox is not None
        for e in self.inbox.poll():
            with self._lock:
                receiver = self._receivers.get(e.key)
            if receiver is not None:
                receiver._ended(e)

    def close(self) -> None:
        """Cancel what is in flight (every lease ends), stop the threads and the receiver."""
        self._closed.set()
        if self.outbox is not None:
            for e in self.outbox.close():
                with self._lock:
                    sender = self._senders.get(int(e.key))
                if sender is not None:
                    sender._ended(e)
        if self.inbox is not None:
            self._posts.put(None)
            for e in self.inbox.close():
                with self._lock:
                    receiver = self._receivers.get(e.key)
                if receiver is not None:
                    receiver._ended(e)
        self._thread.join(timeout=5)


class KvwireKVSender(BaseKVSender):
    """Prefill side of one request: waits for decode's destination, accumulates the chunks' pages, streams."""

    def __init__(self, mgr: KvwireKVManager, bootstrap_addr: str, bootstrap_room: int,
                 req_has_disagg_prefill_dp_rank: bool = False) -> None:
        self.kv_mgr = mgr
        self.bootstrap_addr = bootstrap_addr
        self.room = int(bootstrap_room)
        self.deadline = time.monotonic() + mgr.settings.timeout
        self.num_pages: int | None = None
        self.aux_index: int | None = None
        self.pages: list[int] = []
        self.state_indices: list[Any] | None = None
        self.last = False
        self.dest: dict[str, Any] | None = None
        # decode at another TP: the plan, and each decode rank's destination (those this rank feeds needed)
        self.plan: ReshardPlan | None = None
        self.dests: dict[int, dict[str, Any]] = {}
        self.sending: Sending | None = None
        self.request: RequestSpec | None = None
        self.result: Ended | None = None
        self.error = ""
        self._t0: float | None = None
        self._t1: float | None = None
        mgr._add_sender(self)

    # ---- mailbox thread
    def _mail(self, m: dict[str, Any]) -> None:
        if m.get("type") == "abort":
            self._fail(f"decode aborted: {str(m.get('reason', ''))[:200]}")
        elif m.get("type") != "dest":
            return
        elif m.get("layout") is None:  # the same TP on both sides
            if self.dest is None:
                self.dest = m
        else:
            try:
                theirs = ModelLayout.from_dict(m["layout"])
                if theirs.tp_size == self.kv_mgr.tp_size:
                    raise KvwireError(f"decode rank {m.get('rank')} asks for a re-sharding at the same TP "
                                      f"{theirs.tp_size}")
                plan = _plan(self.kv_mgr.layout, theirs, self.kv_mgr.pools.heads)
                rank = m.get("rank")
                if not isinstance(rank, int) or not 0 <= rank < plan.decode_tp or theirs.tp_rank != rank:
                    raise KvwireError(f"decode rank {rank!r} outside decode TP {plan.decode_tp}")
                if self.plan is not None and plan is not self.plan:
                    raise KvwireError(f"decode rank {rank} sent another layout than its peers")
            except (KvwireError, LayoutError, TypeError, ValueError) as e:
                self._fail(f"decode's re-sharding destination: {type(e).__name__}: {e}")
                return
            self.plan = plan
            self.dests.setdefault(rank, m)

    def _have_dest(self) -> bool:
        """Decode's destination is known: the one (same TP) or every decode rank's this rank feeds."""
        if self.dest is not None:
            return True
        return self.plan is not None and all(d in self.dests for d in self.plan.targets(self.kv_mgr.tp_rank))

    # ---- SGLang's calls
    def init(self, num_kv_indices: int, aux_index: int | None = None) -> None:
        self.num_pages = int(num_kv_indices)
        self.aux_index = None if aux_index is None else int(aux_index)
        if self.pages and len(self.pages) >= self.num_pages:  # every chunk came before init
            self.last = True
            self._start()

    def should_send_kv_chunk(self, num_pages: int, last_chunk: bool) -> bool:
        return num_pages > 0 or last_chunk  # the last chunk carries the state even with no new page

    def send(self, kv_indices: Any, state_indices: list[Any] | None = None, num_kv_tokens: int | None = None,
             **_kw: Any) -> None:
        if self.error or self.sending is not None:
            return
        try:
            self.pages += _indices(kv_indices, "kv pages")
        except KvwireError as e:
            self._fail(str(e))
            return
        if state_indices is not None:
            self.state_indices = list(state_indices)
        if self.num_pages is not None and len(self.pages) >= self.num_pages:
            self.last = True
            self._start()

    def _check_dest(self, d: dict[str, Any]) -> tuple[str, int]:
        """One decode rank's destination agrees with this request (pages, state counts); its endpoint."""
        mgr = self.kv_mgr
        theirs = _indices(d.get("kv"), "decode's kv pages")
        if len(theirs) != len(self.pages):
            raise KvwireError(f"prefill sends {len(self.pages)} pages, decode allocated {len(theirs)}")
        states = d.get("state") or []
        if not isinstance(states, list):
            raise KvwireError("decode's state indices are not a list")
        mine_counts = mgr.pools.state_counts(self.state_indices)
        their_counts = mgr.pools.state_counts([None if s is None else _indices(s, "state") for s in states])
        if mine_counts != their_counts:
            raise KvwireError(f"state index counts differ: prefill {mine_counts}, decode {their_counts}")
        host, port = d.get("endpoint", [None, None])
        if not isinstance(host, str) or not isinstance(port, int):
            raise KvwireError("decode's endpoint is malformed")
        return host, port

    def _start(self) -> None:
        """Every chunk is in and decode's destination is known: one transfer of every buffer (or, to decode
        at another TP, one per decode rank this rank feeds, of its slices)."""
        if self.sending is not None or self.error or not self.last or not self._have_dest():
            return
        mgr = self.kv_mgr
        assert mgr.outbox is not None
        plan = self.plan if self.dest is None else None
        endpoint: tuple[str, int] = ("", 0)
        try:
            if plan is None:
                assert self.dest is not None
                endpoint = self._check_dest(self.dest)
                if self.dest.get("rank") != mgr.rank:
                    raise KvwireError(f"decode rank {self.dest.get('rank')} posted to prefill rank {mgr.rank} "
                                      f"at the same TP")
                rid = str(self.dest.get("rid", ""))
                endpoints: dict[int, tuple[str, int]] = {}
            else:
                endpoints = {d: self._check_dest(self.dests[d]) for d in plan.targets(mgr.tp_rank)}
                rids = {str(self.dests[d].get("rid", "")) for d in endpoints}
                if len(rids) > 1:
                    raise KvwireError(f"decode ranks name the request differently: {sorted(rids)}")
                rid = rids.pop() if rids else f"sglang.{self.room}"
            request = mgr.pools.request(rid, len(self.pages), mgr.pools.state_counts(self.state_indices))
            self.request = request
            tables, slots = mgr.pools.tables(self.pages, self.state_indices, self.aux_index)
            if self.aux_index is not None:
                mgr.pools.load_aux(self.aux_index)
        except (KvwireError, ValueError, TypeError) as e:
            self._fail(f"{type(e).__name__}: {e}")
            return
        self._t0 = time.monotonic()
        if plan is None:
            self.sending = mgr.outbox.begin(str(self.room), request, endpoint, tables, slots)
        elif not endpoints:  # this rank holds nothing the decode ranks draw from it (replicas elsewhere)
            self._t1 = self._t0
            self.result = Ended(str(self.room), State.DONE)
            return
        else:
            self.sending = mgr.outbox.begin_resharded(str(self.room), request, plan, mgr.tp_rank, endpoints,
                                                      tables, slots)
        self.sending.finish()

    def _fail(self, reason: str) -> None:
        first = not self.error
        if first:
            self.error = reason
        if self.sending is not None and self.kv_mgr.outbox is not None:
            self.kv_mgr.outbox.cancel(str(self.room), reason)
        elif first and self.dest is not None:
            self.kv_mgr._tell_decode(self.dest, reason)
        elif first and self.plan is not None:
            for d in sorted(self.dests):
                self.kv_mgr._tell_decode(self.dests[d], reason, self.plan)

    def _ended(self, e: Ended) -> None:
        self._t1 = time.monotonic()
        self.result = e

    def poll(self) -> int:
        if self.result is not None:
            return KVPoll.Success if self.result.ok else KVPoll.Failed
        if self.sending is not None:
            self.kv_mgr._poll_outbox()
            if self.result is not None:
                return KVPoll.Success if self.result.ok else KVPoll.Failed
            return KVPoll.Transferring
        if self.error:
            return KVPoll.Failed
        if not self._have_dest():
            if time.monotonic() > self.deadline:
                missing = "" if self.plan is None else \
                    f" (decode ranks {[d for d in self.plan.targets(self.kv_mgr.tp_rank) if d not in self.dests]})"
                self._fail(f"decode sent no destination{missing} within {self.kv_mgr.settings.timeout:g} s")
                return KVPoll.Failed
            return KVPoll.Bootstrapping
        self._start()
        if self.result is not None:
            return KVPoll.Success if self.result.ok else KVPoll.Failed
        if self.sending is not None:
            return KVPoll.Transferring
        if self.error:
            return KVPoll.Failed
        if time.monotonic() > self.deadline + self.kv_mgr.settings.timeout:
            self._fail("prefill never sent the request's last chunk")
            return KVPoll.Failed
        return KVPoll.WaitingForInput

    def failure_exception(self) -> None:
        reason = self.result.reason if self.result is not None and not self.result.ok else ""
        raise KvwireTransferError(self.room, reason or self.error or "kvwire transfer failed")

    def get_transfer_metric(self) -> KVTransferMetric:
        latency = self._t1 - self._t0 if self._t0 is not None and self._t1 is not None else None
        total = None
        if self.plan is not None and self.dest is None and self.request is not None:  # this rank's slices
            rank = self.kv_mgr.tp_rank
            total = sum(self.plan.wire_bytes(rank, d, self.request) for d in self.plan.targets(rank))
        elif self.sending is not None and self.sending.job is not None:
            total = self.sending.job.placement.payload_bytes
        return KVTransferMetric(transfer_latency_s=latency, transfer_total_bytes=total)

    def abort(self) -> None:
        self._fail("aborted by prefill")

    def clear(self) -> None:
        self.kv_mgr._drop_sender(self)


class KvwireKVReceiver(BaseKVReceiver):
    """Decode side of one request: posts its pages, slots and aux row with its endpoint, then receives."""

    def __init__(self, mgr: KvwireKVManager, bootstrap_addr: str, bootstrap_room: int | None = None) -> None:
        self.kv_mgr = mgr
        self.bootstrap_addr = bootstrap_addr
        self.room = int(bootstrap_room or 0)
        self.rid = f"sglang.{self.room}.{mgr.rank}"
        self.prefill_dp_rank: int | None = None
        self.receiving: Receiving | None = None
        self.aux_index: int | None = None
        self.result: Ended | None = None
        self.error = ""
        self.abort_notified = False
        self.require_staging = False
        self.bootstrap_infos: list[Any] = []
        self.plan: ReshardPlan | None = None  # prefill at another TP
        self.prefill_ranks: list[int] = [mgr.rank]  # the prefill ranks this rank posts to

    @property
    def conclude_state(self) -> int | None:
        if self.result is not None:
            return KVPoll.Success if self.result.ok else KVPoll.Failed
        return KVPoll.Failed if self.error else None

    def init(self, prefill_dp_rank: int) -> None:
        self.prefill_dp_rank = int(prefill_dp_rank)

    def send_metadata(self, kv_indices: Any, aux_index: int | None = None, state_indices: list[Any] | None = None,
                      decode_prefix_len: int | None = None,
                      destination: Any = KVTransferDestination.DEVICE) -> None:
        mgr = self.kv_mgr
        assert mgr.inbox is not None
        try:
            if destination != KVTransferDestination.DEVICE:
                raise KvwireError("host destinations are not supported by the kvwire backend")
            if decode_prefix_len:
                raise KvwireError("decode radix-cache prefix hits are not supported by the kvwire backend")
            if self.prefill_dp_rank is None:
                raise KvwireError("send_metadata before init")
            pages = _indices(kv_indices, "kv pages")
            states = [None if s is None else _indices(s, "state") for s in (state_indices or [])]
            self.plan = mgr.plan_from(self.bootstrap_addr)
            if self.plan is not None:  # every decode rank names the request alike: transfers are per rank pair
                self.rid = f"sglang.{self.room}"
                self.prefill_ranks = sorted(set(self.plan.sources(mgr.tp_rank)) | set(self.plan.paired(mgr.tp_rank)))
            request = mgr.pools.request(self.rid, len(pages), mgr.pools.state_counts(states))
            tables, slots = mgr.pools.tables(pages, states, aux_index)
        except (KvwireError, ValueError, TypeError) as e:
            self._fail(f"{type(e).__name__}: {e}")
            return
        self.aux_index = None if aux_index is None else int(aux_index)
        with mgr._lock:
            mgr._receivers[self.rid] = self
        msg: dict[str, Any] = {"type": "dest", "room": self.room, "rank": mgr.rank, "rid": self.rid,
                               "endpoint": [mgr.endpoint[0], mgr.endpoint[1]], "kv": pages, "state": states,
                               "aux": self.aux_index, "tp": mgr.tp_size}
        if self.plan is None:
            self.receiving = mgr.inbox.expect(self.rid, request, tables, slots)
        else:  # expected before any prefill rank can send (they send once they have every destination)
            self.receiving = mgr.inbox.expect_resharded(self.rid, request, self.plan, mgr.tp_rank, tables, slots)
            msg.update(rank=mgr.tp_rank, layout=mgr.layout.to_dict())
        for p in self.prefill_ranks:
            mgr._post(self.bootstrap_addr, self.prefill_dp_rank, msg, self._fail, rank=p)

    def _fail(self, reason: str) -> None:
        if not self.error:
            self.error = reason
        if self.receiving is not None and self.kv_mgr.inbox is not None:
            self.kv_mgr.inbox.cancel(self.rid, reason)

    def _ended(self, e: Ended) -> None:
        if e.ok and self.aux_index is not None:
            self.kv_mgr.pools.store_aux(self.aux_index)
        self.result = e

    def poll(self) -> int:
        if self.result is None and self.receiving is not None:
            self.kv_mgr._poll_inbox()
        state = self.conclude_state
        if state is not None:
            return state
        if self.prefill_dp_rank is None:
            return KVPoll.Bootstrapping
        return KVPoll.WaitingForInput if self.receiving is None else KVPoll.Transferring

    def failure_exception(self) -> None:
        reason = self.result.reason if self.result is not None and not self.result.ok else ""
        raise KvwireTransferError(self.room, self.error or reason or "kvwire transfer failed")

    def abort(self) -> None:
        """Cancel: the transfer (prefill sees kvwire's cancel) or, before it started, prefill's wait."""
        self._fail("aborted by decode")
        self.abort_notified = True
        if self.prefill_dp_rank is not None:
            for p in self.prefill_ranks:
                self.kv_mgr._post(self.bootstrap_addr, self.prefill_dp_rank,
                                  {"type": "abort", "room": self.room, "reason": "aborted by decode"},
                                  lambda _r: None, rank=p)

    def is_abort_release_safe(self) -> bool:
        return self.result is not None or self.receiving is None

    def clear(self) -> None:
        with self.kv_mgr._lock:
            if self.kv_mgr._receivers.get(self.rid) is self:
                del self.kv_mgr._receivers[self.rid]


class KvwireKVBootstrapServer(BaseKVBootstrapServer):
    """The prefill instance's bootstrap port: the mailbox decode ranks post destinations to."""

    def __init__(self, host: str, port: int) -> None:
        s = Settings()
        host = "::" if host in ("", None) else host  # every interface, IPv6 and IPv4
        self.server = MailboxServer(host, port, s.need_key(), ttl=s.timeout * 2)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    def close(self) -> None:
        self.server.close()


# ------------------------------------------------------------------ plugin


_CLASSES = {"manager": KvwireKVManager, "sender": KvwireKVSender, "receiver": KvwireKVReceiver,
            "bootstrap_server": KvwireKVBootstrapServer}


def _get_kv_class(original: Callable[..., Any], transfer_backend: Any, class_type: Any) -> Any:
    if getattr(transfer_backend, "value", transfer_backend) == BACKEND:
        name = getattr(class_type, "value", class_type)
        if name in _CLASSES:
            return _CLASSES[name]
    return original(transfer_backend, class_type)


def transfer_backend_enum(original: Any) -> Any:
    """SGLang's ``TransferBackend`` with a ``KVWIRE = "kvwire"`` member (the others unchanged)."""
    import enum

    if any(m.value == BACKEND for m in original):
        return original
    members = [(m.name, m.value) for m in original] + [("KVWIRE", BACKEND)]
    return enum.Enum(original.__name__, members, module=original.__module__, qualname=original.__qualname__)


def register() -> None:
    """The ``sglang.srt.plugins`` entry point: make ``--disaggregation-transfer-backend kvwire`` work."""
    from sglang.srt.arg_groups import choices
    from sglang.srt.disaggregation import utils
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if BACKEND not in choices.DISAGG_TRANSFER_BACKEND_CHOICES:
        choices.add_disagg_transfer_backend_choices([BACKEND])
    extended = transfer_backend_enum(utils.TransferBackend)
    if extended is not utils.TransferBackend:
        HookRegistry.register("sglang.srt.disaggregation.utils.TransferBackend", extended, HookType.REPLACE)
    HookRegistry.register("sglang.srt.disaggregation.utils.get_kv_class", _get_kv_class, HookType.AROUND)


__all__ = ["BACKEND", "KvwireKVBootstrapServer", "KvwireKVManager", "KvwireKVReceiver", "KvwireKVSender",
           "KvwireTransferError", "Settings", "register"]

