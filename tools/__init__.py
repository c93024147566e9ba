"""The built-in tools the server runs for the model: :mod:`tools.python_sandbox` (the python tool's sandbox).

Nothing here knows of HTTP or the engine; the server drives these.
"""
