"""Exact fields of Gaussian data, used as exact networks in method tests: closed forms for isotropic Gaussian data
x ~ N(mu, s^2 I) on the linear path (METHODS.md §1.1), and a Gaussian mixture's velocity and flow map (METHODS.md
§1.2, the flow map by RK4 in float64)."""

import torch
from torch import nn


class ExactGaussian(nn.Module):
    """net(z, t, s) = exact average velocity u(z, s, t) (s < t) or exact velocity v(z, t) (s == t)."""

    def __init__(self, mu, std):
        super().__init__()
        self.register_buffer("mu", torch.as_tensor(mu, dtype=torch.float64))
        self.std = float(std)

    def sigma(self, t):
        return torch.sqrt((1 - t) ** 2 * self.std ** 2 + t ** 2)

    def velocity(self, z, t):
        t = t[:, None]
        m_t = (1 - t) * self.mu
        return -self.mu + (t - (1 - t) * self.std ** 2) / self.sigma(t) ** 2 * (z - m_t)

    def flow_map(self, z, t, s):
        t, s = t[:, None], s[:, None]
        return (1 - s) * self.mu + self.sigma(s) / self.sigma(t) * (z - (1 - t) * self.mu)

    def forward(self, z, t, s, cond=None):
        gap = (t - s)[:, None]
        safe_gap = torch.where(gap > 0, gap, torch.ones_like(gap))
        average = (z - self.flow_map(z, t, s)) / safe_gap
        return torch.where(gap > 0, average, self.velocity(z, t))


class ExactVelocity(nn.Module):
    """net(z, t, s) = the exact marginal velocity of a Gaussian mixture (METHODS.md §1.2), in jumpflow's time."""

    def __init__(self, mixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, z, t, s, cond=None):
        return self.mixture.velocity(z, t)


class PerturbedVelocity(nn.Module):
    """net(z, t, s) = v(z, t) + shift cos(z): the exact marginal velocity of a mixture, off by a known smooth D."""

    def __init__(self, mixture, shift: float):
        super().__init__()
        self.mixture, self.shift = mixture, shift

    def forward(self, z, t, s, cond=None):
        return self.mixture.velocity(z, t).to(z.dtype) + self.shift * torch.cos(z)


class ExactMixtureMap(nn.Module):
    """net(z, t, s) = F = (z - Phi_{t->s}(z)) / (t - s), the exact average velocity of a Gaussian mixture from its RK4
    flow map (float64, `n_steps` steps), and the exact velocity v(z, t) when s == t: the exact network of every method
    whose map is f(z, t, s) = z - (t - s) F (MeanFlow's u, a shortcut's normalised jump, IMM's and SoFlow's F).

    `wobble` adds wobble (t - s) sin(3 z): a bent map that keeps f(z, t, t) = z and F(z, t, t) = v but is wrong for
    s < t. Times may be floats or 0-d tensors; s > t (a finite difference past the diagonal) gives v."""

    def __init__(self, mixture, n_steps: int = 200, wobble: float = 0.0):
        super().__init__()
        self.mixture, self.n_steps, self.wobble = mixture, n_steps, wobble

    def forward(self, z, t, s, cond=None):
        t, s = t.expand(z.shape[0]).double(), s.expand(z.shape[0]).double()
        gap = (t - s)[:, None]
        safe_gap = torch.where(gap > 0, gap, torch.ones_like(gap))
        jump = (z - self.mixture.flow_map(z, t, s.clamp(max=t), n_steps=self.n_steps)) / safe_gap
        F = torch.where(gap > 0, jump, self.mixture.velocity(z, t))
        if self.wobble:
            F = F + self.wobble * gap * torch.sin(3 * z)
        return F


def points_on_the_path(mixture, t, seed=0):
    """z_t = (1 - t) x + t eps for x drawn from the mixture and Gaussian eps (float64, one generator seeded `seed`)."""
    gen = torch.Generator().manual_seed(seed)
    x = mixture.draw(t.shape[0], gen).double()
    return (1 - t[:, None]) * x + t[:, None] * torch.randn(x.shape, generator=gen, dtype=torch.float64)
