"""The toy world: a shapes renderer with exact ground truth, a judge that reads attributes back,
and a matched pair of small trained text-to-image models (toy-mmdit, toy-unet) shipped with the package."""

from pathlib import Path

from .judge import Judge
from .world import ATTRIBUTES, BACKGROUNDS, COLORS, SHAPES, SIZES, Scene, caption, render, render_many, scenes

SHIPPED = Path(__file__).with_name("pipelines")
TOY_MODELS = ("toy-mmdit", "toy-unet")

__all__ = ["ATTRIBUTES", "BACKGROUNDS", "COLORS", "SHAPES", "SIZES", "SHIPPED", "TOY_MODELS", "Judge", "Scene",
           "caption", "render", "render_many", "scenes"]
