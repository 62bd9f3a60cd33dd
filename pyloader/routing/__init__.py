"""Where every checkpoint tensor goes: layout types, the name router, model-family presets and the load plan."""
