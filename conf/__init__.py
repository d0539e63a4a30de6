"""Hydra configuration tree of fedvitgan (YAML files; this file only makes the folder importable)."""
