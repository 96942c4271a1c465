"""Sans-IO core: cache layouts, the wire format, chunk planning and transfer state machines.

Nothing in this package opens a socket, starts a thread, reads a clock or imports torch.
"""
