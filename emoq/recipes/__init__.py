"""QLoRA fine-tuning recipes (``emoq finetune``)."""

from emoq.recipes.config import Recipe, RecipeError, load_recipe

__all__ = ["Recipe", "RecipeError", "load_recipe"]
