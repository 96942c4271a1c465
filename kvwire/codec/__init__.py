"""Sans-IO core: what is sent, how it is framed, and what each end of a session does about it.

Owns: cache layouts and requests (``layout``, ``hf``, ``presets``, ``compat``, ``convert``, ``reshard``:
what a model caches, what one request's payload is, whether and how two layouts exchange it), the wire
format (``frames``: the data header and control frames; ``manifest``, ``messages``: typed reading of their
bodies), chunk planning (``plan``) and capacity-probe payloads (``probe``), and the protocol itself: the
per-transfer state machines (``transfer``), the tables of which control message is legal when
(``rules``), the handshake's messages (``handshake``) and the two sans-IO session engines (``txengine``
for the sending end, ``rxengine`` for the receiving end) that take decoded frames, chunk events and a
``now`` and return the actions both share (``actions``) or their own. ``kvwire.tcp`` and any other
transport drive these; the engines never call back into them.

Must not know: sockets, threads, locks, clocks (time arrives as a ``now`` argument; the only files read
are model configs, by ``hf`` and ``presets``), payload buffers in the engines (a chunk is its header,
length and digest), handles, user callbacks, congestion control, any transport, or torch/cupy
(``convert`` works on numpy arrays). Nothing here imports a kvwire package but ``kvwire.errors`` (and
``fixtures``, a deprecated alias of ``kvwire.testing.fixtures``).
"""
