"""edge-asr tests."""
