"""Flower apps for fedclip: the only package that imports ``flwr``.

``client_app.py`` and ``server_app.py`` are thin: they decode a message, call the same core
functions the in-process runner uses (``fedclip.runtime.client``, ``Algorithm`` hooks), and
encode the reply. Only adapter weights and metrics cross the wire.
"""
