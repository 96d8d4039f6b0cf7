"""Closed forms for isotropic Gaussian data x ~ N(mu, s^2 I) on the linear path (METHODS.md §1.1), used as exact
networks in method tests."""

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
