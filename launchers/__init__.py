"""Entry points: submit (SLURM via submitit, or local), train (one rank), evaluate, export, sync_mlflow."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.runtime import command


class _DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring's own line breaks and indentation, and each option's default beside it where it has one: None,
    False and [] mean "not given", which the option's own help explains ("(default: None)" after "default: the
    node's CPUs" contradicted it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if default is None or default is False or default == [] or default is argparse.SUPPRESS or "%(" in text:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def parser(prog: str, doc: str, show_defaults: bool = False) -> argparse.ArgumentParser:
    """An argument parser whose ``--help`` is the launcher's whole docstring, as plain text: the first paragraph is
    the description, the rest the epilog (double backticks mark code for readers of the source, not of a terminal)."""
    description, _, epilog = doc.replace("``", "").strip().partition("\n\n")
    formatter = _DefaultsHelpFormatter if show_defaults else argparse.RawDescriptionHelpFormatter
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog or None,
                                   formatter_class=formatter)


def next_commands(run_dir: str, val_data: str) -> str:
    """The lines under a run's summary that use its weights: export them, then evaluate the export."""
    run_dir, py = Path(run_dir), command()
    return (f"  export   {py} launchers/export.py {run_dir} --out {run_dir / 'export'}\n"
            f"  evaluate {py} launchers/evaluate.py --checkpoint {run_dir / 'export'} --data {val_data}")
