"""``dora-tune`` command line: a click group; each command is a thin wrapper over the library."""

from __future__ import annotations

import click

from dora_tune import __version__
from dora_tune.cli.cache import cache
from dora_tune.cli.fit import fit, report
from dora_tune.cli.lookup import lookup
from dora_tune.cli.profile import profile
from dora_tune.cli.selfcheck import selfcheck
from dora_tune.cli.show import gpus, show


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dora-tune")
def cli() -> None:
    """Autotuned, dispatched DoRA kernels: check, profile and inspect them."""


for _command in (profile, show, gpus, cache, lookup, fit, report, selfcheck):
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point."""
    cli()
