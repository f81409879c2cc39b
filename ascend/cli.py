"""The `ascend` command: a click group whose subcommands are imported only when called.

Importing torch takes seconds, so `ascend --help` must not import every subcommand's module.
Each entry below is "module:attribute" of a click command defined next to the code it drives.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from typing import Callable

import click

from ascend.errors import AscendDeployError

COMMANDS = {  # name: (module:attribute, one-line help shown by `ascend --help`)
    "doctor": ("ascend.doctor:doctor", "Report the accelerator backend chosen and why, devices, versions."),
    "plan": ("ascend.planner.cli:plan", "Choose a parallel layout and expert placement for a cluster."),
    "synth": ("convert.synth:synth_command", "Write a synthetic checkpoint in the published V4 layout."),
    "convert": ("convert.cli:convert_command", "Convert and shard a checkpoint for a plan."),
    "verify": ("convert.cli:verify_command", "Check converted shards against their manifests and source."),
    "export-onnx": ("ascend.onnx_export:export_onnx_command", "Export the attention stages as ONNX graphs."),
    "run": ("ascend.run:run_command", "Launch multi-device inference with torchrun."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, help_) in sorted(COMMANDS.items())])


def device_option(f):
    """`--device auto|npu|cuda|cpu`, defaulting to $ASCEND_DEVICE or auto (the commands that touch a device)."""
    return click.option(
        "--device", "device", type=click.Choice(["auto", "npu", "cuda", "cpu"]),
        default=lambda: os.environ.get("ASCEND_DEVICE", "auto"), show_default="$ASCEND_DEVICE or auto",
        help="Accelerator backend to use.")(f)


def json_option(f):
    """`--json`: print one machine-readable JSON document instead of tables."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")(f)


@click.group(cls=LazyGroup)
@click.version_option(package_name="ascend-deploy")
def cli() -> None:
    """DeepSeek-V4 on Ascend NPUs: plan, convert, verify, run, export."""


@contextlib.contextmanager
def user_errors():
    """The CLI's error contract around a command: an AscendDeployError, or an OSError on a path the user named
    (missing folder, permissions, full disk), is one `error:` line on stderr and exit code 2, never a traceback.
    The commands that write much write to temporary names first, so nothing half-written looks complete."""
    try:
        yield
    except AscendDeployError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        click.echo(f"error: {where}{e.strerror or e}", err=True)
        sys.exit(2)


def run_command(command: click.Command, argv: list[str] | None = None) -> None:
    """Run a click command (the `ascend` group, or a script's own command) under `user_errors`; click's own
    usage errors keep click's message."""
    with user_errors():
        try:
            command.main(args=argv, standalone_mode=False)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)


def run_script(main: Callable[[], int | None]) -> None:
    """A script's argparse `main()` under `user_errors` (a device that is not there, a bad file or value)."""
    with user_errors():
        code = main()
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `ascend` command."""
    run_command(cli, argv)


if __name__ == "__main__":
    main()
