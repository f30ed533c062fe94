"""The session broker: the control plane that places WebRTC sessions on towers."""

__version__ = "0.1.0"
