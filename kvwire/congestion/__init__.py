"""Congestion probing, link estimation and pacing for kvwire lanes.

Owns: reading ``TCP_INFO`` (``tcpinfo``), turning samples into a ``LinkState`` (``estimator``), sampling
live sockets on a thread (``monitor``) and the lane/pacing/CC policy (``controller``). Acts only on
sockets it is handed. Must not know: sessions, transfers, the wire format.
"""
