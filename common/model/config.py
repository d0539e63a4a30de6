"""Model hyper-parameters, and the presets in ``conf/model/*.yaml``."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import CONF_DIR, ConfigError, dataclass_from_mapping, load_yaml


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the unified ViT cGAN-classifier (see ``conf/model/`` for the presets).

    The discriminator trunk is a ViT of ``depth`` blocks of width ``embed_dim`` over
    ``patch_size``-pixel patches with a CLS token; ``classifier_depth`` extra blocks (0: none) sit
    between the trunk and the classification head. The generator is a ViTGAN-style transformer of
    ``generator_depth`` self-modulated blocks whose style comes from ``z_dim`` noise and a
    ``class_embed_dim`` class embedding through ``mapping_layers`` MLP layers; ``z`` also seeds each
    token through a ``token_noise_dim``-wide map (0: position tokens only).

    Every size is required: the sizes live in the presets alone (``model_preset("tiny")``, then
    ``dataclasses.replace`` to change one). ``trunk_prior`` (null in every preset) and
    ``classifier_grid`` (0 in every preset) are not sizes and have defaults.
    """

    name: str
    image_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    classifier_depth: int
    generator_embed_dim: int
    generator_depth: int
    generator_num_heads: int
    z_dim: int
    class_embed_dim: int
    style_dim: int
    mapping_layers: int
    token_noise_dim: int
    qkv_bias: bool
    spectral_norm: bool
    #: A safetensors file of trunk weights to start from (``fedvitgan prior``), read by ``initial_model``.
    #: Not a size, so it has a default: a model recorded before the key existed (a run folder, the
    #: reference classifier's metadata) had none.
    trunk_prior: str | None = None
    #: What the classification head reads besides the normalised CLS feature: the patch tokens,
    #: normalised and averaged over a ``classifier_grid`` x ``classifier_grid`` grid of the image
    #: (0: the CLS feature alone). Where a thing is in the image (a digit's strokes) survives the grid
    #: and not the CLS token of a frozen trunk. Default 0, for models recorded before the key existed.
    classifier_grid: int = 0
    #: Whether the classification head subtracts a centre from what it reads (a buffer, zero until a
    #: hospital sets it). Under DP with a frozen trunk each hospital sets it once, from a Gaussian
    #: release of its features' mean (``privacy.centre_noise_multiplier``; common/privacy/centre.py),
    #: and FedAvg averages it: a frozen trunk's features share a large common part, which would take
    #: most of each patch's clipped gradient. Default false, for models recorded before the key existed.
    classifier_centre: bool = False
    #: Whether the classification head whitens what it reads (after the centre) by a buffer matrix,
    #: the identity until a trainer sets it from the covariance of images that cost no privacy budget
    #: (``train.whitening``; common/train/whitening.py). Default false, for models recorded before the
    #: key existed.
    classifier_whitening: bool = False

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        for name in ("embed_dim", "generator_embed_dim"):
            heads = self.num_heads if name == "embed_dim" else self.generator_num_heads
            if getattr(self, name) % heads:
                raise ValueError(f"{name} {getattr(self, name)} is not divisible by {heads} heads")
        if min(self.depth, self.generator_depth, self.mapping_layers) < 1 or self.classifier_depth < 0:
            raise ValueError("depth, generator_depth and mapping_layers must be >= 1")
        side = self.image_size // self.patch_size
        if isinstance(self.classifier_grid, bool) or not isinstance(self.classifier_grid, int) \
                or not 0 <= self.classifier_grid <= side:
            raise ValueError(f"classifier_grid must be an integer in [0, {side}] (patches per side), "
                             f"got {self.classifier_grid!r}")
        if self.classifier_centre and self.classifier_depth:
            raise ValueError("classifier_centre needs classifier_depth 0: the centre is measured on the trunk's "
                             "features, which the head's own blocks would change")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def classifier_features(self) -> int:
        """The width of what the classification head reads: the CLS feature and the grid cells."""
        return self.embed_dim * (1 + self.classifier_grid ** 2)


def model_preset(name: str) -> ModelConfig:
    """The preset ``conf/model/<name>.yaml``."""
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        raise ConfigError(f"unknown model preset {name!r} (no {path}); presets: {known}")
    return dataclass_from_mapping(ModelConfig, load_yaml(path), f"model ({path})")


def preset_names() -> list[str]:
    """Names of all model presets shipped in ``conf/model``."""
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
