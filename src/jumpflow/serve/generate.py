"""`POST /generate`: the request, its checks, and the model side of a micro-batch.

Every check that depends on the request alone happens here, before the request joins a batch, so one bad request
never fails the others of its forward pass. Samples depend only on (model, steps, class, guidance) and each request's
own seed: a batch draws each request's noise from its own seeded generator, concatenates, runs the model once and
splits the result, so a request gets the samples it would get alone (up to float rounding of batched matmuls).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import JumpflowError

FIELDS = ("n", "steps", "seed", "class", "guidance", "format", "model")
FORMATS = ("png", "json")
MAX_SEED = 2 ** 63 - 1
MAX_GUIDANCE = 20.0


class BadRequest(JumpflowError):
    """A request the server refuses with a 4xx status and this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class GenerateRequest:
    n: int
    steps: int
    seed: int
    cls: Optional[int]
    guidance: Optional[float]
    format: str
    model: str  # "student" (the served model) or "teacher"

    @property
    def key(self) -> Hashable:
        """What must be equal for two requests to share a forward pass."""
        return (self.model, self.steps, self.cls, self.guidance)


def _integer(body: Dict[str, Any], name: str) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():  # 4.0 is 4; JSON numbers have no integer type of their own
        return int(value)
    raise BadRequest(f"{name} must be an integer, got {value!r}")


def parse_request(body: Any, cards: Dict[str, Optional[Dict[str, Any]]], max_n: int) -> GenerateRequest:
    """Check a decoded JSON body against the model cards ({"student": card, "teacher": card or None})."""
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object with fields {', '.join(FIELDS)}, got {type(body).__name__}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(map(repr, unknown))}; valid: {', '.join(FIELDS)}")
    model = body.get("model", "student")
    if model not in cards:
        raise BadRequest(f"model must be one of {', '.join(map(repr, cards))}, got {model!r}")
    card = cards[model]
    if card is None:
        raise BadRequest("no teacher is attached: start the server with --teacher RUN to compare with one")
    fmt = body.get("format", "png")
    if fmt not in FORMATS:
        raise BadRequest(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")

    n = _integer(body, "n")
    n = n if n is not None else min(64, max_n)
    if not 1 <= n <= max_n:
        raise BadRequest(f"n must be in [1, {max_n}] (the server's --max-n), got {n}")
    steps = _integer(body, "steps")
    steps = steps if steps is not None else card["default_steps"]
    if not 1 <= steps <= card["max_steps"]:
        raise BadRequest(f"steps {steps} is not supported by this {card['method']} model: give 1 to "
                         f"{card['max_steps']} (the page offers {card.get('supported_steps', [steps])})")
    if card.get("power_of_two_steps") and steps & (steps - 1):
        raise BadRequest(f"steps {steps} is not supported by this {card['method']} model: it jumps in powers of two "
                         f"(1, 2, 4, ... up to {card['max_steps']})")
    seed = _integer(body, "seed")
    if seed is None:
        seed = secrets.randbelow(2 ** 31)  # sent back in X-Seed so the picture can be reproduced
    if not 0 <= seed <= MAX_SEED:
        raise BadRequest(f"seed must be in [0, 2^63 - 1], got {seed}")

    cls = _integer(body, "class")
    if cls is not None:
        if not card["classes"]:
            raise BadRequest(f"this {card['method']} model is unconditional; it takes no class")
        if not 0 <= cls < card["classes"]:
            raise BadRequest(f"class must be in [0, {card['classes'] - 1}], got {cls}")
    guidance = body.get("guidance")
    if guidance is not None:
        if not card["guidance"]:
            raise BadRequest(f"this {card['method']} model takes no guidance (it needs a class-conditional model "
                             f"whose sampler has classifier-free guidance)")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
                or not 0.0 <= guidance <= MAX_GUIDANCE:
            raise BadRequest(f"guidance must be a number in [0, {MAX_GUIDANCE:g}], got {guidance!r}")
        if cls is None:
            raise BadRequest("guidance steers towards a class: give a class with it")
        guidance = float(guidance)
    return GenerateRequest(n, int(steps), seed, cls, guidance, fmt, model)


class SampleRunner:
    """run_batch for the MicroBatcher: one `generate` call for all requests of a key, on the worker thread."""

    def __init__(self, models: Dict[str, Any]):
        self.models = models

    def __call__(self, key: Hashable, payloads: Sequence[Tuple[int, int]]) -> List[Tensor]:
        name, steps, cls, guidance = key
        model = self.models[name]
        noise = torch.cat([model.noise(n, seed) for n, seed in payloads])  # each request's own seeded noise
        options = {} if guidance is None else {"guidance": guidance}
        # The seed also fixes a stochastic sampler's own draws (multistep consistency re-noising): exactly the draws
        # of a request that runs alone; in a merged batch, those of its first request.
        samples = model.generate(noise=noise, steps=steps, seed=payloads[0][1], cls=cls, **options)
        return list(samples.split([n for n, _ in payloads]))
