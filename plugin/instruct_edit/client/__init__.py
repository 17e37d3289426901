"""Talking to the engine: the HTTP API client, edit jobs, and the managed engine process.

No Krita and no widgets here; networking is Qt's asynchronous QNetworkAccessManager, so
nothing blocks the UI thread while the engine works.
"""
