"""Pure tests: the saga model and the settings (no Redis, no worker)."""
