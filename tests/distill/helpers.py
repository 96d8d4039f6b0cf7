"""What several distillation tests share: an exact Gaussian teacher, and a hand loop that trains a pair student."""

import torch

from jumpflow.distill import Teacher
from tests.gaussian import ExactGaussian


def exact_gaussian_teacher(mu, std, teacher_id: str) -> Teacher:
    """The exact flow-matching velocity of N(mu, std^2 I) data (float64 inside), whose 1 -> 0 map is mu + std z."""
    field = ExactGaussian(torch.as_tensor(mu, dtype=torch.float64), std)
    return Teacher.from_velocity(lambda z, t, labels: field.velocity(z.double(), t.double()).to(z.dtype),
                                 (len(mu),), teacher_id=teacher_id)


def train_on_pairs(method, teacher, workspace, steps: int, lr: float = 3e-3):
    """Attach `teacher` and take `steps` AdamW steps of `method.loss` (pair methods read only the batch's size)."""
    method.attach_teacher(teacher, workspace)
    optimizer = torch.optim.AdamW(method.net.parameters(), lr=lr)
    batch = torch.zeros(256, 2)
    for step in range(steps):
        method.begin_step(step)  # as the Trainer does
        loss = method.loss(batch, None).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return method
