"""Distillation: a frozen teacher and the (noise, teacher sample) pairs students learn from.

Light on import: the modules below need only torch, numpy, safetensors and tqdm; a teacher loads the method
registry (jumpflow.api) only when it reads a checkpoint.
"""

from .pairs import PairCache, Pairs, generate_pairs
from .teacher import Teacher

__all__ = ["Teacher", "PairCache", "Pairs", "generate_pairs"]
