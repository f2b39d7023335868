"""whisper-gpu: a Wyoming speech-to-text server on faster-whisper for Home Assistant."""

__version__ = "0.1.0"
