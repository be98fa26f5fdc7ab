"""ReSSFormer: a recursive sparse structured Transformer (You & Liu 2025), single-device PyTorch.

    from ressformer import ModelConfig, build_model, PRESETS
    model = build_model(ModelConfig.from_preset("debug"))
    out = model(input_ids, labels=input_ids)   # out.logits, out.loss, out.aux
"""

from ressformer.config import PRESETS, ModelConfig

__all__ = ["ModelConfig", "PRESETS", "build_model", "ModelOutput"]


def build_model(config: ModelConfig, **kwargs):
    """Build the architecture named by `config.arch` (ressformer | transformer)."""
    if config.arch == "ressformer":
        from ressformer.model import ReSSFormerForCausalLM

        return ReSSFormerForCausalLM(config, **kwargs)
    if config.arch == "transformer":
        from ressformer.baseline import TransformerForCausalLM

        return TransformerForCausalLM(config, **kwargs)
    raise ValueError(f"unknown arch {config.arch!r}: choose 'ressformer' or 'transformer'")


def __getattr__(name):
    if name == "ModelOutput":
        from ressformer.output import ModelOutput

        return ModelOutput
    raise AttributeError(name)
