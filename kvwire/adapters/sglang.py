"""SGLang PD-disaggregation transfer backend over kvwire: attention KV pages, Mamba/GDN state slots, SWA
window pages and the aux (first token, logprobs) rows, from the prefill instance's pools into the decode's.

Owns: ``KvwireKVSender``, ``KvwireKVReceiver``, ``KvwireKVBootstrapServer`` (SGLang's ``BaseKVSender``/
``BaseKVReceiver``/``BaseKVBootstrapServer``, the ``KVPoll`` lifecycle of one request), ``KvwireKVManager``
(``BaseKVManager``, one rank's engine: in ``sglang_manager``, re-exported here) and
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
``kvwire`` imports this module. Must not know: kvwire's internals beyond ``lifecycle``, ``endpoints``,
``sglang_pools``, ``sglang_bootstrap``, ``kvwire.cuda`` and the re-sharding plan (``codec.reshard``,
``reshard.sub_request_id``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sglang.srt.disaggregation.base.conn import (
    BaseKVBootstrapServer,
    BaseKVReceiver,
    BaseKVSender,
    KVPoll,
    KVTransferDestination,
    KVTransferMetric,
)

from ..codec.layout import ModelLayout, RequestSpec
from ..codec.reshard import ReshardPlan, paired_ranks
from ..codec.transfer import State
from ..errors import KvwireError, LayoutError
from .endpoints import split_endpoint
from .lifecycle import Ended, Receiving, Sending
from .sglang_bootstrap import MailboxServer
from .sglang_manager import BACKEND, KvwireKVManager, KvwireTransferError, Settings, checked_indices, plan_between


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
        mgr.add_sender(self)

    # ---- mailbox thread
    def take_mail(self, m: dict[str, Any]) -> None:
        """A message for this room from decode (its destination, or an abort); called by the manager."""
        if m.get("type") == "abort":
            self._fail(f"decode aborted: {str(m.get('reason', ''))[:200]}")
        elif m.get("type") != "dest":
            return
        elif m.get("layout") is None:  # the same TP on both sides
            if isinstance(m.get("tp"), int) and m["tp"] != self.kv_mgr.tp_size:
                self._fail(f"decode rank {m.get('rank')} runs TP {m['tp']}, this prefill TP {self.kv_mgr.tp_size}, "
                           f"and it posted no layout to re-shard into (it had no parallel info of this prefill)")
            elif self.dest is None:
                self.dest = m
        else:
            try:
                theirs = ModelLayout.from_dict(m["layout"])
                if theirs.tp_size == self.kv_mgr.tp_size:
                    raise KvwireError(f"decode rank {m.get('rank')} asks for a re-sharding at the same TP "
                                      f"{theirs.tp_size}")
                plan = plan_between(self.kv_mgr.layout, theirs, self.kv_mgr.pools.heads)
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
            self.pages += checked_indices(kv_indices, "kv pages")
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
        theirs = checked_indices(d.get("kv"), "decode's kv pages")
        if len(theirs) != len(self.pages):
            raise KvwireError(f"prefill sends {len(self.pages)} pages, decode allocated {len(theirs)}")
        states = d.get("state") or []
        if not isinstance(states, list):
            raise KvwireError("decode's state indices are not a list")
        mine_counts = mgr.pools.state_counts(self.state_indices)
        their_counts = mgr.pools.state_counts([None if s is None else checked_indices(s, "state") for s in states])
        if mine_counts != their_counts:
            raise KvwireError(f"state index counts differ: prefill {mine_counts}, decode {their_counts}")
        try:
            return split_endpoint(d.get("endpoint"), what="decode's endpoint")
        except (TypeError, ValueError) as e:
            raise KvwireError(f"decode's endpoint is malformed: {e}") from None

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
                if self.dest.get("rank") != mgr.tp_rank:
                    raise KvwireError(f"decode rank {self.dest.get('rank')} posted to prefill rank {mgr.tp_rank} "
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
            self.kv_mgr.tell_decode(self.dest, reason)
        elif first and self.plan is not None:
            for d in sorted(self.dests):
                self.kv_mgr.tell_decode(self.dests[d], reason, self.plan)

    def transfer_ended(self, e: Ended) -> None:
        """The transfer's end (from the manager's ``poll_outbox``)."""
        self._t1 = time.monotonic()
        self.result = e

    def poll(self) -> int:
        if self.result is not None:
            return KVPoll.Success if self.result.ok else KVPoll.Failed
        if self.sending is not None:
            self.kv_mgr.poll_outbox()
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
        self.kv_mgr.drop_sender(self)


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
        self.prefill_ranks: list[int] = [mgr.tp_rank]  # the prefill ranks this rank posts to

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
            pages = checked_indices(kv_indices, "kv pages")
            states = [None if s is None else checked_indices(s, "state") for s in (state_indices or [])]
            self.plan = mgr.plan_from(self.bootstrap_addr)
            if self.plan is not None:  # every decode rank names the request alike: transfers are per rank pair
                self.rid = f"sglang.{self.room}"
                self.prefill_ranks = sorted(set(self.plan.sources(mgr.tp_rank)) | set(self.plan.paired(mgr.tp_rank)))
            request = mgr.pools.request(self.rid, len(pages), mgr.pools.state_counts(states))
            tables, slots = mgr.pools.tables(pages, states, aux_index)
        except (KvwireError, ValueError, TypeError) as e:
            self._fail(f"{type(e).__name__}: {e}")
            self._tell_prefill(f"decode rank {mgr.tp_rank} failed before posting: {e}"[:400])
            return
        self.aux_index = None if aux_index is None else int(aux_index)
        mgr.add_receiver(self)
        msg: dict[str, Any] = {"type": "dest", "room": self.room, "rank": mgr.tp_rank, "rid": self.rid,
                               "endpoint": [mgr.endpoint[0], mgr.endpoint[1]], "kv": pages, "state": states,
                               "aux": self.aux_index, "tp": mgr.tp_size}
        if self.plan is None:
            self.receiving = mgr.inbox.expect(self.rid, request, tables, slots)
        else:  # expected before any prefill rank can send (they send once they have every destination)
            self.receiving = mgr.inbox.expect_resharded(self.rid, request, self.plan, mgr.tp_rank, tables, slots)
            msg["layout"] = mgr.layout.to_dict()
        for p in self.prefill_ranks:
            mgr.post_to_prefill(self.bootstrap_addr, self.prefill_dp_rank, msg, self._fail, rank=p)

    def _tell_prefill(self, reason: str) -> None:
        """The request failed before its destination was posted: abort it on the prefill ranks SGLang pairs
        this rank with, so they fail now rather than at their timeout."""
        mgr = self.kv_mgr
        info = mgr.prefill_info_table.get(self.bootstrap_addr)
        if self.prefill_dp_rank is None or info is None:
            return
        ranks = paired_ranks(info.attn_tp_size, mgr.tp_size, mgr.tp_rank) if info.attn_tp_size != mgr.tp_size \
            else [mgr.tp_rank]
        self.prefill_ranks = list(ranks)
        for p in ranks:
            mgr.post_to_prefill(self.bootstrap_addr, self.prefill_dp_rank, {"type": "abort", "room": self.room,
                                                                  "reason": reason}, lambda _r: None, rank=p)

    def _fail(self, reason: str) -> None:
        if not self.error:
            self.error = reason
        if self.receiving is not None and self.kv_mgr.inbox is not None:
            self.kv_mgr.inbox.cancel(self.rid, reason)

    def transfer_ended(self, e: Ended) -> None:
        """The transfer's end (from the manager's ``poll_inbox``): on success the aux row is stored."""
        if e.ok and self.aux_index is not None:
            self.kv_mgr.pools.store_aux(self.aux_index)
        self.result = e

    def poll(self) -> int:
        if self.result is None and self.receiving is not None:
            self.kv_mgr.poll_inbox()
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
                self.kv_mgr.post_to_prefill(self.bootstrap_addr, self.prefill_dp_rank,
                                  {"type": "abort", "room": self.room, "reason": "aborted by decode"},
                                  lambda _r: None, rank=p)

    def is_abort_release_safe(self) -> bool:
        return self.result is not None or self.receiving is None

    def clear(self) -> None:
        self.kv_mgr.drop_receiver(self)


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

