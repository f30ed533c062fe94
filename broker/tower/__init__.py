"""The tower agent: the WebRTC peer for many sessions at once."""
