"""``python -m meterhub`` is the ``meterhub`` command."""

from meterhub.cli import main

main()
