"""``dynarch export RUN [--format pt2|torchscript|onnx|state_dict] [--fold-bn] [--out FILE]``: the
run's final model as a file that runs without dynarch (dynarch/trained.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynarch.errors import DynarchError, first_line
from dynarch.query_cli import resolve_run
from dynarch.trained import FORMATS, example_input, export, load, read_model_spec

SUFFIX = {
    "pt2": "model.pt2",
    "torchscript": "model.torchscript.pt",
    "onnx": "model.onnx",
    "state_dict": "state_dict.pt",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynarch export",
        description="Write a run's final model (its last checkpoint) as a standalone file.",
    )
    p.add_argument("run_dir", help="a run directory, or latest: the newest under ./runs")
    p.add_argument("--format", choices=FORMATS, default="pt2")
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the convs first")
    p.add_argument("--out", type=Path, help="file to write (default: RUN/model.<format>)")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        run_dir = resolve_run(args.run_dir)
        model = load(run_dir)
        example = example_input(read_model_spec(run_dir))
        out = args.out if args.out is not None else run_dir / SUFFIX[args.format]
        export(model, example, args.format, out, fold_bn=args.fold_bn)
    except (DynarchError, OSError) as exc:
        print(f"dynarch: error: {first_line(exc)}", file=sys.stderr)
        return 1
    print(f"{args.format} written to {out}")
    return 0
