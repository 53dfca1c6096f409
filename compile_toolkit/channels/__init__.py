"""Channel analysis: which channels of a captured graph are coupled, zero or dead."""

from .analysis import ChannelAnalysis, ChannelGroup, analyze

__all__ = ["ChannelAnalysis", "ChannelGroup", "analyze"]
