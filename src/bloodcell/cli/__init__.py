"""The ``bloodcell`` command: a thin Typer layer over the Python API.

Each pipeline stage registers its commands from its own module here (``data``, ``train`` ...); this
module only builds the app and turns user-facing errors into one line and a non-zero exit.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

import typer

from bloodcell import __version__
from bloodcell.cli.messages import error_line, warning_line


def _flags_show_no_value_type() -> None:
    """Typer 0.29's help prints ``<bool>`` beside every flag, as if ``--tta`` took a value (and ``--tta true``
    would then read "true" as an input). A flag takes none, so its type column is left empty. Typer has no
    setting for this; the hook is checked for, so another Typer version only shows its own help. It applies
    to every Typer app in the process, which for the ``bloodcell`` command is this one."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None:
        return

    def display_type_rich(self: TyperOption, ctx: object) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_show_no_value_type()

app = typer.Typer(
    name="bloodcell",
    help="Train, evaluate, explain and serve a leakage-aware classifier of B-ALL subtypes from blood-smear "
    "images. Research tool only: not a medical device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bloodcell {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Train, evaluate, explain and serve a leakage-aware B-ALL subtype classifier (research use only)."""


def _register_commands() -> None:
    # Each module adds its commands to ``app``; import order is the order in --help.
    import importlib

    for module in ("data", "train", "evaluate", "serve", "tune", "download", "demo"):
        importlib.import_module(f"bloodcell.cli.{module}")


_register_commands()


def main() -> None:
    """Entry point: run the app, printing user errors as one line without a traceback."""
    from bloodcell.config import ConfigError
    from bloodcell.data.decode import ImageError
    from bloodcell.data.splits import LeakageError
    from bloodcell.errors import UserError

    # SIGTERM (timeout, docker stop, SLURM, torchrun) is handled as Ctrl-C is, so that every cleanup runs:
    # no temporary file is left behind, and training stops as after an interrupt, ready to resume. Both
    # handlers also remember the signal, for the exit status.
    previous = {number: signal.signal(number, _interrupt) for number in (signal.SIGINT, signal.SIGTERM)}
    Interrupted.by, Interrupted.reported = None, False
    try:
        app()
    except (UserError, ConfigError, ImageError, LeakageError, FileNotFoundError, NotADirectoryError) as error:
        error_line(f"error: {_path_error(error) if isinstance(error, OSError) and error.errno else error}")
        sys.exit(2)
    except RuntimeError as error:
        if _debugging() or _is_first_process() or not _lost_its_peer(error):
            raise
        # A training process whose first process ended (interrupted, refused, failed) learns of it at its next
        # collective; the first process has said why, in one line, so this one leaves without a traceback.
        sys.exit(1)
    except OSError as error:
        if error.errno not in ENVIRONMENT_ERRNOS or _debugging():
            raise  # BLOODCELL_DEBUG=1 keeps the traceback, for a bug report
        # The machine's state, not a bug: a full disk, a read-only or forbidden folder, a file where a
        # folder should be. One line naming the path says what to fix.
        error_line(f"error: {_path_error(error)}")
        sys.exit(2)
    except SystemExit as exit_:
        # Typer turns an interrupt into exit status 130, silently, and a server (uvicorn) that shuts down
        # cleanly on a signal ends with status 0: say which signal it was, and give each its own status
        # (130 for Ctrl-C, 143 for SIGTERM), as shells and schedulers expect.
        if exit_.code != 130 and not (Interrupted.by is not None and exit_.code in (0, None)):
            raise
        terminated = Interrupted.by == signal.SIGTERM
        # A command that said how to continue said it in this one line; the other processes of a distributed
        # training run (a terminal's Ctrl-C reaches them all) leave it to the first.
        if not Interrupted.reported and _is_first_process():
            warning_line("terminated" if terminated else "interrupted")
        sys.exit(143 if terminated else 130)
    finally:
        for number, handler in previous.items():  # main() called in-process (tests) leaves the caller as it was
            signal.signal(number, handler)


#: What the OS's words for a path of the wrong kind mean for the user ("File exists" from making a folder).
_PATH_KIND = {
    errno.EISDIR: "is a folder, where a file is needed",
    errno.ENOTDIR: "a file stands in this path where a folder is needed",
    errno.EEXIST: "already exists as a file, where a folder is needed",
}


def _debugging() -> bool:
    """``BLOODCELL_DEBUG=1``: keep the tracebacks that are otherwise turned into one line (for a bug report)."""
    return os.environ.get("BLOODCELL_DEBUG", "") not in ("", "0")


def _is_first_process() -> bool:
    """False in the other processes of a distributed training run (only training starts them)."""
    if "bloodcell.train.run" not in sys.modules:  # no training here: spare a command torch's import
        return True
    from bloodcell.train.run import is_first_process

    return is_first_process()


def _lost_its_peer(error: RuntimeError) -> bool:
    """A collective that failed because another process of the run ended: gloo's "Connection closed (reset)
    by peer", or torch's own network error (the rendezvous store went with the first process)."""
    distributed = sys.modules.get("torch.distributed")
    network_error = getattr(distributed, "DistNetworkError", ())
    return isinstance(error, network_error) or "by peer" in str(error)


def _path_error(error: OSError) -> str:
    """``path: what is wrong`` for an OSError from the machine's state."""
    where = f"{error.filename}: " if error.filename else ""
    return where + _PATH_KIND.get(error.errno or 0, error.strerror or str(error))


#: OSError numbers that describe the environment (space, permissions, the kind of a path), not a bug.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.EEXIST,
                      errno.ENOTDIR, errno.ENOENT, errno.ENAMETOOLONG}  # fmt: skip


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised where the program is, as Python's own KeyboardInterrupt; ``by`` keeps the
    last signal received (the exception itself may be caught and replaced on its way out), ``reported``
    whether a command has already said so (:func:`say_interrupted`)."""

    by: int | None = None
    reported: bool = False


def say_interrupted(advice: str) -> None:
    """Say how to continue after Ctrl-C or SIGTERM, in the one line :func:`main` prints for them:
    "interrupted; ADVICE" (or "terminated; ADVICE"); :func:`main` then adds none of its own."""
    warning_line(f"{'terminated' if Interrupted.by == signal.SIGTERM else 'interrupted'}; {advice}")
    Interrupted.reported = True


def _interrupt(signum: int, frame: object) -> None:
    if signum == signal.SIGTERM and Interrupted.by == signal.SIGTERM:
        # Already stopping. A training process of `--devices N` can get SIGTERM twice: from `timeout` (which
        # signals the whole process group) and as passed on by the first process; raised again, it would
        # break off the first one's cleanup with a traceback. A second Ctrl-C still stops at once.
        return
    Interrupted.by = signum
    raise Interrupted()
