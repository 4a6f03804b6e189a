"""Model registry: config.model.name -> (config dataclass, flax module)."""
from fmjax.models.decoder import DecoderConfig, DecoderLM
from fmjax.models.encoder import EncoderConfig, EncoderMLM

MODELS = {
    "decoder": (DecoderConfig, DecoderLM),
    "encoder": (EncoderConfig, EncoderMLM),
}


def get_model(name: str):
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is not a registered model; valid: {sorted(MODELS)}")
    return MODELS[name]
