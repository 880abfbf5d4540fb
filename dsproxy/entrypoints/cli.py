"""The `dsproxy` command: parse arguments, load settings once, run one subcommand.

Each command module exposes `add_commands(subparsers)`; every subcommand sets `run`, a function
`(args, settings) -> exit code`. Our errors print as one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from dsproxy.config import load_settings
from dsproxy.entrypoints import (
    controller_commands,
    demo_commands,
    ledger_commands,
    localchain_commands,
    node_commands,
    serve,
    wallet_commands,
)
from dsproxy.entrypoints.log_repeats import RepeatedLines
from dsproxy.errors import DsproxyError

__all__ = ["main"]

_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})

_COMMAND_MODULES = (
    ledger_commands,
    wallet_commands,
    localchain_commands,
    serve,
    controller_commands,
    node_commands,
    demo_commands,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsproxy", description="Prepaid LLM tokens on Solana and DePHY (Nostr)."
    )
    parser.add_argument("--config", type=Path, help="TOML config file (or DSPROXY_CONFIG)")
    parser.add_argument("--data-dir", type=Path, help="data directory (or DSPROXY_DATA_DIR)")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,  # `debug` as well as `DEBUG`
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMAND_MODULES:
        module.add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RepeatedLines())
    try:
        if getattr(args, "own_settings", False):  # `demo`: the environment is not its business
            settings = load_settings({})
        else:
            settings = load_settings(config_file=args.config, data_dir=args.data_dir)
        code = int(args.run(args, settings))
        sys.stdout.flush()  # a full disk is found here and said below, not at exit
        return code
    except DsproxyError as exc:
        print(f"dsproxy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        if not _reader_gone():
            raise  # another pipe or a socket broke: an error worth its traceback
        # the reader went away (`dsproxy export - | head`): stop as a Unix filter does
        _discard_stdout()
        return 128 + signal.SIGPIPE
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS or exc.filename is not None:
            raise
        # `dsproxy balance ... > /dev/full`: what we print cannot be written (a command that
        # writes a file names that file in an error of our own)
        print(f"dsproxy: error: cannot write standard output: {exc.strerror}", file=sys.stderr)
        _discard_stdout()
        return 2


def _discard_stdout() -> None:
    """Send what is left of standard output to /dev/null, so that flushing it at exit does
    not fail once more."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _reader_gone() -> bool:
    """Whether whoever reads our standard output has closed it."""
    poller = select.poll()
    poller.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


if __name__ == "__main__":
    sys.exit(main())
