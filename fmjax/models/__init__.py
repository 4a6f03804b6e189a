"""Model registry: config.model.name -> (config dataclass, flax module)."""
from fmjax.models.decoder import DecoderConfig, DecoderLM

MODELS = {
    "decoder": (DecoderConfig, DecoderLM),
}


def get_model(name: str):
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is not a registered model; valid: {sorted(MODELS)}")
    return MODELS[name]
