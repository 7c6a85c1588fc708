"""Flower apps for fedclip: the only package that imports ``flwr``.

``client_app.py`` and ``server_app.py`` are thin: they decode a message, call the same core
functions the in-process runner uses (``fedclip.core.client``, ``Algorithm`` hooks), and
encode the reply. Only adapter weights and metrics cross the wire.
"""

try:
    import flwr  # noqa: F401
except ImportError:  # pragma: no cover - exercised by tests/test_packaging.py
    from fedclip.errors import FedclipError

    raise FedclipError("the Flower apps need Flower: pip install 'fedclip[flower]' "
                       "(or 'fedclip[simulation]' for Ray simulation)") from None
