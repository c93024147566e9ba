"""`python -m server`."""

from server.main import main

main()
