"""The global model of a run checkpoint, rebuilt from the run's own config, and how images reach it.

Images go to the model as in training (``common/data``): decoded to RGB, centre-cropped to a square,
resized to ``model.image_size`` pixels, scaled to [-1, 1].
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from common.config import ConfigError, dataclass_from_mapping
from common.data.base import uint8_to_tensor
from common.data.images import read_image, resize_square
from common.data.registry import configured_class_names
from common.model import ModelConfig, UnifiedViTGAN, build_model
from simulations.run_folder import RunCheckpoint, RunFolderError, resolve_checkpoint


@dataclass
class RunModel:
    """A run's global model after one round, in eval mode, with the class names it predicts."""

    model: UnifiedViTGAN
    class_names: tuple[str, ...]
    checkpoint: RunCheckpoint

    @property
    def image_size(self) -> int:
        return int(self.model.cfg.image_size)

    @property
    def config(self) -> dict[str, Any]:
        return self.checkpoint.config


def run_class_names(config: dict[str, Any], where: Path) -> tuple[str, ...]:
    """The class names a run's model was built for (its config, else its class folders if readable)."""
    try:
        return configured_class_names(config.get("data") or {})
    except ConfigError as error:
        raise RunFolderError(f"{where}: cannot tell the run's class names: {error}") from error


def load_run_model(path: Path | str, round_: int | None = None, device: str = "cpu") -> RunModel:
    """The global model of ``path`` (a run folder or a checkpoint file) after ``round_`` (default: the
    last complete round); ``RunFolderError`` naming the file when it cannot be rebuilt."""
    checkpoint = resolve_checkpoint(path, round_)
    summary_path = checkpoint.run_dir / "summary.json"
    names = run_class_names(checkpoint.config, summary_path)
    try:
        cfg = dataclass_from_mapping(ModelConfig, checkpoint.config.get("model") or {}, "model")
        model = build_model(cfg, len(names))
    except (ConfigError, ValueError) as error:
        raise RunFolderError(f"{summary_path}: the run's model config cannot be rebuilt: {error}") from error
    try:
        state = load_file(str(checkpoint.path))
    except (SafetensorError, OSError) as error:
        raise RunFolderError(f"cannot read checkpoint {checkpoint.path}: {error}") from error
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise RunFolderError(f"checkpoint {checkpoint.path} does not fit the model of {summary_path} "
                             f"({len(names)} classes): {str(error).splitlines()[0]}") from error
    return RunModel(model.to(device).eval(), names, checkpoint)


def image_tensor(path: Path, image_size: int) -> torch.Tensor:
    """One image file as the model's input: (3, S, S) float in [-1, 1]; ``DataError`` naming the file."""
    return uint8_to_tensor(resize_square(read_image(path), image_size))


def run_command_parser(prog: str, description: str | None, examples: Sequence[str], device: bool = True
                       ) -> argparse.ArgumentParser:
    """The parser every post-run command starts from: ``RUN``, ``--round`` and (``device``) ``--device``."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="examples:\n" + "\n".join(f"  {e}" for e in examples))
    parser.add_argument("run", type=Path, help="a run folder (its latest checkpoint) or RUN/checkpoints/round-NNNN.safetensors")
    parser.add_argument("--round", type=int, default=None, help="the round's checkpoint (default: the last complete round)")
    if device:
        parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    return parser

