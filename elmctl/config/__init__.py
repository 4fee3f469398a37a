"""Recipes: schemas, loading/validation, derived numbers."""

from elmctl.config.derived import derive, layer_shapes, param_count
from elmctl.config.loader import RecipeError, available_recipes, load_recipe
from elmctl.config.schema import InstructConfig, ModelConfig, PretrainConfig, Recipe

__all__ = [
    "Recipe",
    "ModelConfig",
    "PretrainConfig",
    "InstructConfig",
    "RecipeError",
    "load_recipe",
    "available_recipes",
    "derive",
    "layer_shapes",
    "param_count",
]
