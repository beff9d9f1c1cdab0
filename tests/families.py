"""Tiny untrained BLIP-retrieval and SigLIP checkpoints on the world's vocabulary:
the other dual-encoder families of CONTRACT.md, for tests that must not be CLIP-only."""

import torch

from worlds.tinyclip import TinyClipSpec, build_image_processor, build_tokenizer, save_checkpoint, world_vocabulary

SPEC = TinyClipSpec(width=32, layers=1, heads=2, embed_dim=16)
_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
_TEXT = dict(
    _TOWER,
    vocab_size=len(world_vocabulary()) + 4,
    max_position_embeddings=SPEC.max_text_len,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=3,
)
_VISION = dict(_TOWER, image_size=SPEC.image_size, patch_size=SPEC.patch_size)
EMBED_DIM = {"blip": 24, "siglip": 32}


def tiny_family_model(family: str):
    if family == "blip":
        from transformers import BlipConfig, BlipForImageTextRetrieval

        config = BlipConfig(text_config=dict(_TEXT, sep_token_id=3), vision_config=_VISION, image_text_hidden_size=24)
        return BlipForImageTextRetrieval(config)
    if family == "siglip":
        from transformers import SiglipConfig, SiglipModel

        return SiglipModel(SiglipConfig(text_config=_TEXT, vision_config=_VISION))
    # Families xbt refuses by name: SigLIP 2 (variable-resolution patches) and a text-only encoder.
    if family == "siglip2":
        from transformers import Siglip2Config, Siglip2Model

        vision = dict(_TOWER, patch_size=SPEC.patch_size, num_patches=(SPEC.image_size // SPEC.patch_size) ** 2)
        return Siglip2Model(Siglip2Config(text_config=_TEXT, vision_config=vision))
    if family == "bert":
        from transformers import BertConfig, BertModel

        return BertModel(BertConfig(**_TEXT))
    raise ValueError(f"unknown family {family!r}: use one of {sorted(EMBED_DIM)}")


def save_tiny_family(family: str, out, seed: int = 0):
    """A checkpoint folder in the Hugging Face layout (model, tokenizer, image processor)."""
    torch.manual_seed(seed)
    save_checkpoint(
        tiny_family_model(family),
        build_tokenizer(world_vocabulary(), SPEC.max_text_len),
        build_image_processor(SPEC),
        out,
    )
    return out
