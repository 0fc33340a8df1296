"""Assembly sources of the emulated kernel (read by textpoke.image)."""
