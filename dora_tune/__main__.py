"""``python -m dora_tune`` = the ``dora-tune`` command."""

from dora_tune.cli import main

main()
