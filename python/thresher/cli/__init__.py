"""`thresher` command line: one entry point, one module per subcommand.

Each subcommand lives beside the code it drives and exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only names them and imports the one that runs, so
``thresher --help`` and a mistyped command answer without importing torch. Errors are
reported here, for every subcommand alike: a bad input or a file-system error is one line
``thresher CMD: error: ...`` (exit status 2; ``THRESHER_DEBUG=1`` shows the traceback), and
Ctrl-C is one line saying how to continue (exit status 130).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

DESCRIPTION = ("thresher: choose pretraining data (score a pool with BLISS or a baseline, select from "
               "the scores) and train a small GPT with communication-efficient optimizers.")

# name -> (module, one-line help, what to do after Ctrl-C)
SUBCOMMANDS = {
    "score": ("thresher.cli.score", "score a pool of documents (BLISS or a baseline)",
              "rerun with --resume to continue"),
    "select": ("thresher.cli.select", "select documents from scores (top-k, Gumbel, threshold)",
               "nothing was written"),
    "train": ("thresher.cli.train", "train the small GPT with any thresher optimizer on N ranks",
              "rerun with --resume to continue"),
    "demo": ("thresher.cli.demo", "the end-to-end demo on the embedded corpus",
             "rerun with --resume to continue"),
}


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        where = repr(os.fsdecode(exc.filename))
        if exc.filename2 is not None:
            where += f" -> {os.fsdecode(exc.filename2)!r}"
        return f"{exc.strerror}: {where}"
    return str(exc)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("thresher")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="thresher", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"thresher {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # only the subcommand being run is imported (its arguments need its module)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (module_name, help_, _) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"\nthresher {args.command}: interrupted; {SUBCOMMANDS[args.command][2]}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError) as exc:
        # Bad input or a file-system error: one clear line (the message names the argument
        # or the file), not a traceback.
        if os.environ.get("THRESHER_DEBUG"):
            raise
        print(f"thresher {args.command}: error: {_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
