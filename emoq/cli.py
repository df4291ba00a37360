"""The ``emoq`` command: ``emoq finetune RECIPE.yaml [--set key=value ...]``."""

from __future__ import annotations

import argparse
import sys


def _end_process_group(existed: bool) -> None:
    """Destroy the default process group if this command created it (accelerate does, lazily,
    under ``torchrun``): a process that exits with a live gloo group can abort in interpreter
    finalisation (``terminate called without an active exception``, SIGABRT; measured once in
    CI's two-process test), turning a finished run into a failed launch. A group that existed
    before the command (a caller's own) is left alone."""
    import torch.distributed as dist

    if existed or not (dist.is_available() and dist.is_initialized()):
        return
    from accelerate.state import AcceleratorState

    dist.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)  # a later run in this process starts afresh


def _finetune(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    existed = dist.is_available() and dist.is_initialized()
    try:
        return _run_finetune(args)
    finally:
        _end_process_group(existed)


def _run_finetune(args: argparse.Namespace) -> int:
    from emoq.recipes.config import RecipeError, load_recipe

    if args.no_progress:  # the libraries' own bars too (model loading, dataset preparation)
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    try:
        recipe = load_recipe(args.recipe, args.set)
        from emoq.recipes.run import finetune

        metrics = finetune(recipe, progress=not args.no_progress)
    except RecipeError as err:
        print(f"emoq finetune: error: {err}", file=sys.stderr)
        return 2
    if not metrics["main_process"]:  # torchrun / accelerate launch: the main process reports
        return 0
    before, after = metrics["eval_before"], metrics["eval_after"]
    print(f"optimizer {metrics['optimizer']}, {metrics['steps']} steps on {metrics['train_examples']} examples "
          f"({metrics['device']}, {metrics['compute_dtype']})")
    print(f"held-out loss {before['loss']:.4f} -> {after['loss']:.4f}, perplexity {before['perplexity']:.3f} -> "
          f"{after['perplexity']:.3f} ({100 * metrics['perplexity_change']:+.1f}%)")
    print(f"final pulse {metrics['final_pulse']:.3g}, skipped steps {metrics['skipped_steps']}, "
          f"wall {metrics['seconds_total']:.0f} s (train {metrics['seconds_train']:.0f} s), "
          f"peak RSS {metrics['peak_rss_mb']:.0f} MB")
    print(f"wrote {recipe.output_dir}/adapter, metrics.json, loss_pulse.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emoq", description="emoq command line")
    sub = parser.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="QLoRA fine-tune from a recipe YAML")
    ft.add_argument("recipe", help="recipe YAML file (see recipes/)")
    ft.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe key (YAML value), repeatable")
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.command == "finetune":
        return _finetune(args)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
