"""The `recscale` command.

`recscale`, `recscale --help` and `recscale --version` answer without importing torch, Lightning or MLflow (each
command imports what it needs when it runs). Data and analysis commands (`prepare`, `encode`, `synth`, `inspect`,
`toy`, `analyze`) are plain argparse; training commands (`fit`, `validate`, `test`, `predict`) are a LightningCLI
(see recscale.train); `grid` and `report` have their own parsers (recscale.grid, recscale.report).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time

# every command with its one-line summary: the top-level help is built from this table (keep it complete)
COMMANDS: dict[str, str] = {
    "prepare": "raw Kaggle file -> Parquet shards + spec.json + vocab/",
    "encode": "encode a raw file with the ids of a prepared directory",
    "synth": "write a synthetic raw file in the dataset's own format",
    "inspect": "stream a prepared split through the DataModule, summarised",
    "fit": "train a model, tracked in MLflow (--config FILE ..., LightningCLI)",
    "validate": "validation AUC/log loss of a checkpoint (--ckpt_path)",
    "test": "test AUC/log loss of a checkpoint (--ckpt_path)",
    "predict": "click probabilities of a checkpoint (--ckpt_path)",
    "toy": "ICML 2024 toy experiment (App. G, Fig. 4), in seconds",
    "analyze": "every diagnostic of a run's best checkpoint, logged to the run",
    "grid": "run a paper grid (icml24, sigir, data-fraction) as fit cells",
    "report": "paper tables and figures from finished runs vs published ones",
}
MAX_REJECT_FRACTION = 0.05  # = recscale.data.prepare.MAX_REJECT_FRACTION (not imported: keeps `recscale --help` fast)
ENCODE_SPLITS = ("test", "8/1/1")  # = recscale.data.prepare.ENCODE_SPLITS
DATA_COMMANDS = ("prepare", "encode", "synth", "inspect", "toy", "analyze")
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _versions() -> str:
    """``recscale X (torch Y, lightning Z, mlflow W)`` from the installed distributions' metadata (no imports)."""
    from importlib import metadata

    from recscale import __version__

    def v(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"recscale {__version__} (torch {v('torch')}, lightning {v('lightning')}, mlflow {v('mlflow')})"


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recscale", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Embedding collapse and multi-embedding scaling of CTR models (PyTorch Lightning + MLflow).",
        epilog="`recscale COMMAND --help` shows a command's options. Quick start on the bundled sample:\n"
               "  recscale prepare criteo --input data/criteo/sample.train --output prepared/criteo_sample\n"
               "  recscale fit --config configs/dnn.yaml --config configs/data/criteo_sample.yaml\n"
               "  mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db")
    p.add_argument("--version", action="version", version=_versions())
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, line in COMMANDS.items():
        sub.add_parser(name, help=line, add_help=False)
    return p


def _data_parser() -> argparse.ArgumentParser:
    from recscale.data.formats import PROTOCOLS

    p = argparse.ArgumentParser(prog="recscale", description="recscale data commands")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prepare", help=COMMANDS["prepare"])
    pr.add_argument("dataset", help="criteo or avazu")
    pr.add_argument("--input", required=True, help="raw train.txt (Criteo) or train.csv (Avazu), plain or .gz")
    pr.add_argument("--output", help="output directory (default: prepared/DATASET_PROTOCOL)")
    pr.add_argument("--protocol", default="icml24", help=f"one of {', '.join(PROTOCOLS)} (default icml24)")
    pr.add_argument("--min-count", type=int, default=None, help="tokens seen fewer times map to OOV (default: protocol's)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the random split and the training shuffle (default 0)")
    pr.add_argument("--split-ratio", default=None, help="train,valid,test proportions, e.g. 7,2,1 (default: the "
                    "protocol's: 8,1,1; criteo_x1 7,2,1)")
    pr.add_argument("--shard-rows", type=int, default=1 << 20, help="rows per Parquet shard (default 1048576)")
    pr.add_argument("--row-group-rows", type=int, default=1 << 16, help="rows per row group (default 65536)")
    pr.add_argument("--overwrite", action="store_true",
                    help="replace an existing output directory (only one that recscale wrote: it has spec.json)")
    pr.add_argument("--strict", action="store_true", help="stop at the first bad line instead of rejecting it")
    pr.add_argument("--max-reject-fraction", type=float, default=MAX_REJECT_FRACTION,
                    help=f"fail when more than this fraction of lines is rejected (default {MAX_REJECT_FRACTION})")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")

    en = sub.add_parser("encode", help=COMMANDS["encode"])
    en.add_argument("--data", required=True, help="prepared directory whose vocab/ to use")
    en.add_argument("--input", required=True, help="raw file in the same format")
    en.add_argument("--output", required=True, help="output directory (a dataset with its own spec.json)")
    en.add_argument("--split", default="test", choices=ENCODE_SPLITS,
                    help="test: every row in the test split, in file order (default); 8/1/1: prepare's seeded split")
    en.add_argument("--overwrite", action="store_true",
                    help="replace an existing output directory (only one that recscale wrote: it has spec.json)")
    en.add_argument("--max-reject-fraction", type=float, default=MAX_REJECT_FRACTION,
                    help=f"fail when more than this fraction of lines is rejected (default {MAX_REJECT_FRACTION})")
    en.add_argument("--no-progress", action="store_true")

    sy = sub.add_parser("synth", help=COMMANDS["synth"])
    sy.add_argument("dataset", help="criteo or avazu")
    sy.add_argument("--rows", type=int, required=True)
    sy.add_argument("--output", required=True)
    sy.add_argument("--seed", type=int, default=0)

    ins = sub.add_parser("inspect", help=COMMANDS["inspect"])
    ins.add_argument("data_dir")
    ins.add_argument("--split", default="train", choices=["train", "valid", "test"])
    ins.add_argument("--batch-size", type=int, default=2048)
    ins.add_argument("--num-workers", type=int, default=0)

    toy = sub.add_parser("toy", help=COMMANDS["toy"])
    toy.add_argument("--output", default="outputs/toy", help="directory for toy_ia.csv and toy_ia.png")
    toy.add_argument("--dim", type=int, default=10, help="embedding size K (default 10)")
    toy.add_argument("--iterations", type=int, default=5000)
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--no-mlflow", action="store_true", help="do not log a run to MLflow (experiment 'toy')")

    an = sub.add_parser("analyze", help=COMMANDS["analyze"])
    an.add_argument("--run", help="MLflow run id or run name (unique in the store)")
    an.add_argument("--ckpt", help="a checkpoint file instead of a run's best checkpoint")
    an.add_argument("--data", help="prepared data directory (default: the run's)")
    an.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    an.add_argument("--sample-rows", type=int, default=50_000)
    an.add_argument("--normalize-rows", action="store_true", help="IA of row-normalised tables (reference code)")
    an.add_argument("--output", help="also write the figures and CSV tables to this directory")
    return p


def _print_summary(summary: dict) -> None:
    print(json.dumps(summary, indent=2))


def run_data_command(argv: list[str]) -> int:
    from recscale.data.formats import PrepareError

    args = _data_parser().parse_args(argv)
    try:
        if args.command == "prepare":
            from recscale.data.prepare import Options, prepare

            out = args.output or f"prepared/{args.dataset}_{args.protocol}"
            split = None
            if args.split_ratio is not None:
                try:
                    split = tuple(int(x) for x in args.split_ratio.split(","))
                except ValueError:
                    split = ()
                if len(split) != 3:
                    raise PrepareError(f"--split-ratio must be three integers like 7,2,1, got {args.split_ratio!r}")
            opts = Options(dataset=args.dataset, protocol=args.protocol, min_count=args.min_count, seed=args.seed,
                           split=split, shard_rows=args.shard_rows, row_group_rows=args.row_group_rows,
                           strict=args.strict, progress=not args.no_progress,
                           max_reject_fraction=args.max_reject_fraction)
            s = prepare(args.input, out, opts, overwrite=args.overwrite)
            rows = s["rows"]
            print(f"prepared {args.dataset} ({args.protocol}) in {s['seconds']} s -> {s['output']}\n"
                  f"  rows: train {rows['train']:,}  valid {rows['valid']:,}  test {rows['test']:,}"
                  f"  rejected {s['rejected']:,}" + (f" (see {out}/rejected.tsv)" if s["rejected"] else "") +
                  f"\n  vocabulary: {s['total_vocabulary']:,} ids over {len(s['vocabulary'])} fields: "
                  + ", ".join(f"{k}={v}" for k, v in s["vocabulary"].items()))
            if "warning" in s:
                print(f"recscale prepare: warning: {s['warning']}", file=sys.stderr)
        elif args.command == "encode":
            from recscale.data.prepare import encode_file

            s = encode_file(args.input, args.data, args.output, args.overwrite, not args.no_progress, args.split,
                            args.max_reject_fraction)
            _print_summary(s)
            if "warning" in s:
                print(f"recscale encode: warning: {s['warning']}", file=sys.stderr)
        elif args.command == "synth":
            from recscale.data.synth import synth

            t = time.perf_counter()
            path = synth(args.dataset, args.rows, args.output, args.seed)
            print(f"wrote {args.rows:,} synthetic {args.dataset} rows to {path} in {time.perf_counter() - t:.1f} s")
        elif args.command == "inspect":
            _inspect(args)
        elif args.command == "toy":
            from recscale.diagnostics.toy import toy_command

            _print_summary(toy_command(args.output, args.dim, args.iterations, args.seed, mlflow_log=not args.no_mlflow))
        elif args.command == "analyze":
            from recscale.diagnostics.analyze import analyze

            _print_summary(analyze(args.run, args.ckpt, args.data, args.tracking_uri, args.sample_rows,
                                   args.normalize_rows, args.output))
    except PrepareError as e:
        print(f"recscale {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"recscale {args.command}: interrupted; nothing was left behind that looks complete", file=sys.stderr)
        return 130
    return 0


def _inspect(args) -> None:
    import numpy as np

    from recscale.data.datamodule import CTRDataModule

    dm = CTRDataModule(args.data_dir, batch_size=args.batch_size, num_workers=args.num_workers)
    loader = {"train": dm.train_dataloader, "valid": dm.val_dataloader, "test": dm.test_dataloader}[args.split]()
    t, rows, pos, batches = time.perf_counter(), 0, 0.0, 0
    seen_max = np.zeros(len(dm.fields), dtype=np.int64)
    for x, y in loader:
        rows += len(y)
        pos += float(y.sum())
        batches += 1
        seen_max = np.maximum(seen_max, x.max(0).values.numpy())
    dt = time.perf_counter() - t
    spec = dm.spec
    print(f"{args.data_dir} [{spec['dataset']}/{spec['protocol']}] split {args.split}: {rows:,} rows in {batches} "
          f"batches, positive rate {pos / max(rows, 1):.4f}, {rows / dt:,.0f} rows/s")
    print(f"  fields {len(dm.fields)}, ids in range: {bool((seen_max < np.array(dm.field_dims)).all())}, "
          f"total vocabulary {sum(dm.field_dims):,}")


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):  # `recscale`, `recscale --help`, `recscale --version`
        p = _top_parser()
        if not argv:
            p.print_help()
            sys.exit(0)
        p.parse_args(argv[:1])  # --help / --version exit here
        p.error(f"unknown option {argv[0]}: put options after the command (recscale COMMAND --help)")
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        print(f"recscale: error: unknown command {argv[0]!r}" + (f" (did you mean {close[0]}?)" if close else "")
              + f"; commands: {', '.join(COMMANDS)} (recscale --help)", file=sys.stderr)
        sys.exit(2)
    if argv[0] in DATA_COMMANDS:
        sys.exit(run_data_command(argv))
    if argv and argv[0] == "grid":
        from recscale.grid import main as grid_main

        sys.exit(grid_main(argv[1:]))
    if argv and argv[0] == "report":
        from recscale.report import main as report_main

        sys.exit(report_main(argv[1:]))
    from recscale.train import cli_main

    # argv=None lets LightningCLI read sys.argv itself (passing a copy makes it warn on every command)
    cli_main(None if from_command_line else argv)
