"""`thresher` command line: one entry point, one module per subcommand.

Each subcommand lives beside the code it drives and exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only names them, so heavy imports (torch, tokenizers) happen
for the subcommand that runs, not for ``thresher --help``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "score": ("thresher.selection.score_cmd", "score a pool of documents (BLISS or a baseline)"),
    "select": ("thresher.selection.select_cmd", "select documents from scores (top-k, Gumbel, threshold)"),
    "train": ("thresher.optim.train_cmd", "train the small GPT with any thresher optimizer on N ranks"),
    "demo": ("thresher.demo", "the end-to-end demo on the embedded corpus"),
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (module, help_) in SUBCOMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = (module, help_)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="thresher", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = {}
    for name, (module_name, help_) in _available().items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_, description=help_))
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # Bad input: one clear line (the message names the argument), not a traceback.
        # THRESHER_DEBUG=1 re-raises for the traceback.
        if os.environ.get("THRESHER_DEBUG"):
            raise
        print(f"thresher {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
