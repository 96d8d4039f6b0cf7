"""What the server says about a model (`GET /model`) and the rules a request is checked against.

`LoadedModel.describe()` is the source where the model has it; the same facts are otherwise read from the method and
the checkpoint's data info, so the server works with either (and checks requests the same way).
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional

STEP_CAP = 128  # the most jumps one request may ask of a model that sets no limit itself (a request's work is bounded)
TEACHER_STEPS = 100  # the multi-step reference a one-step model is compared with


def accepts_guidance(model) -> bool:
    """Classifier-free guidance needs labels (a class-conditional model) and a sampler that takes `guidance=`."""
    if not model.info.num_classes:
        return False
    return "guidance" in inspect.signature(model.method.sample).parameters


def max_steps(model) -> int:
    limit = getattr(model.method, "max_sample_steps", None)
    return int(limit) if limit else STEP_CAP


def supported_steps(model) -> List[int]:
    """The step counts the page offers: powers of two up to the method's limit, and the method's default (100 for
    flow matching)."""
    limit, default = max_steps(model), int(model.method.default_sample_steps)
    steps = [2 ** k for k in range(limit.bit_length()) if 2 ** k <= limit]
    return sorted(set(steps) | ({default} if default <= limit else set()))


def _own_description(model) -> Dict[str, Any]:
    return {"method": model.method.name, "paper": getattr(model.method, "paper", ""),
            "data": {"name": model.info.name, "kind": model.info.kind, "shape": list(model.info.shape)},
            "classes": int(model.info.num_classes), "supported_steps": supported_steps(model),
            "default_steps": int(model.method.default_sample_steps), "max_steps": max_steps(model),
            "power_of_two_steps": False, "guidance": accepts_guidance(model), "train_step": int(model.step)}


def describe(model) -> Dict[str, Any]:
    """method, paper, data {name, kind, shape}, classes (0: unconditional; class_names where the model names them),
    supported_steps, default_steps, max_steps, power_of_two_steps, guidance (bool) and train_step: from
    `LoadedModel.describe()` where the model has it, else read from the method and the data info."""
    card = _own_description(model)
    given = model.describe() if callable(getattr(model, "describe", None)) else {}
    if not isinstance(given, dict):
        return card
    for ours, theirs in (("method", "method"), ("paper", "paper"), ("classes", "num_classes"),
                         ("supported_steps", "steps"), ("default_steps", "default_steps"),
                         ("max_steps", "max_steps"), ("power_of_two_steps", "power_of_two_steps"),
                         ("guidance", "guidance"), ("train_step", "training_step")):
        if given.get(theirs) is not None:  # max_steps None means "no limit of its own": keep our cap
            card[ours] = given[theirs]
    names = given.get("classes")
    if isinstance(names, list) and any(isinstance(name, str) for name in names):
        card["class_names"] = [str(name) for name in names]
    card["max_steps"] = min(int(card["max_steps"]), STEP_CAP)
    card["supported_steps"] = sorted(int(s) for s in card["supported_steps"] if int(s) <= card["max_steps"])
    return card


def check_teacher(student, teacher) -> None:
    """A teacher is compared picture for picture with the student: same data kind and shape."""
    from ..errors import JumpflowError

    if (teacher.info.kind, tuple(teacher.info.shape)) != (student.info.kind, tuple(student.info.shape)):
        raise JumpflowError(f"the teacher makes {teacher.info.kind} data of shape {tuple(teacher.info.shape)} but the "
                            f"model makes {student.info.kind} data of shape {tuple(student.info.shape)}; give a "
                            f"teacher trained on the same data")


def teacher_card(teacher: Optional[Any]) -> Optional[Dict[str, Any]]:
    if teacher is None:
        return None
    card = describe(teacher)
    steps = min(TEACHER_STEPS, card["max_steps"])
    if card["power_of_two_steps"]:
        steps = 2 ** (steps.bit_length() - 1)
    return {"method": card["method"], "paper": card["paper"], "steps": steps, "default_steps": steps,
            "supported_steps": [steps], "classes": card["classes"], "guidance": card["guidance"],
            "max_steps": card["max_steps"], "power_of_two_steps": card["power_of_two_steps"]}
