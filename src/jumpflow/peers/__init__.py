"""Peers: other packages' implementations of a method jumpflow also has, run on the same data, backbone, trainer and
budget so benchmarks show jumpflow beside what users would pick instead. A peer calls its package (an optional
dependency, imported only when the peer is built); it never copies the package's code."""

# Importing the modules registers them in jumpflow.methods.METHODS.
from . import facebook_flow_matching  # noqa: F401
