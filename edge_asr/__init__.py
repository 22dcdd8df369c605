"""edge-asr: real-time streaming speech-to-text for the smart-home edge."""

__version__ = "0.2.0"
