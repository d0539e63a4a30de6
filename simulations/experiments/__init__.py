"""``fedvitgan experiment``: every (variant, setting, seed) of a comparison, on the same patches and budget."""
