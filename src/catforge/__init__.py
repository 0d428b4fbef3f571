"""catforge: graph neural networks for catalyst surfaces (Open Catalyst S2EF, IS2RE, IS2RS)."""

__version__ = "0.1.0"
