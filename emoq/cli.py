"""The ``emoq`` command: ``emoq finetune RECIPE.yaml [--set key=value ...]``."""

from __future__ import annotations

import argparse
import sys


def _finetune(args: argparse.Namespace) -> int:
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
