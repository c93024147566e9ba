"""The built-in tools the server runs for the model: :mod:`tools.python_sandbox` (the python tool's
sandbox and its sessions) and :mod:`tools.browser` (search, open and find behind an SSRF guard).

Nothing here knows of HTTP requests to the server or of the engine; the server drives these.
"""
