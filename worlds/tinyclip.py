"""Small CLIP checkpoints in the Hugging Face layout, for the demo zoo and tests.

The hub is unreachable here, so the project makes its own models. They are
ordinary `CLIPModel` checkpoints with a word-level fast tokenizer and a
`CLIPImageProcessor`, saved with `save_pretrained`: the product loads them
through exactly the same Auto-class path as a hub checkpoint.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import shapes

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
# CLIP's text tower pools at the first eos_token_id; an eos id of 2 triggers the
# legacy argmax pooling in transformers, so eos must not be 2.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


@dataclass(frozen=True)
class TinyClipSpec:
    """Architecture of one zoo tier."""

    width: int = 64
    layers: int = 2
    heads: int = 4
    embed_dim: int = 64
    image_size: int = 32
    patch_size: int = 8
    max_text_len: int = 40
    # The text tower's own width and depth; None: the vision tower's. Lets an
    # experiment give a tier a weaker text tower than image tower (docs/method.md).
    text_width: int | None = None
    text_layers: int | None = None

    def __post_init__(self):
        assert self.width % self.heads == 0, "width must divide into heads"
        assert self.text_width is None or self.text_width % self.heads == 0, "text_width must divide into heads"
        assert self.image_size % self.patch_size == 0, "image_size must be a multiple of patch_size"


def world_vocabulary() -> list[str]:
    """Every word the world's captions can use, plus punctuation."""
    words: set[str] = set()
    phrases = [*sum(shapes.SHAPES.values(), []), *shapes.COLOURS, *sum(shapes.SIZES.values(), [])]
    phrases += list(shapes.CELL_NAMES.values()) + [p.format("") for p in shapes.CELL_PHRASES]
    phrases += list(shapes.NUMBER_WORDS.values())
    phrases += ["a an and there is picture of shape shapes left right of above below"]
    for p in phrases:
        words.update(re.findall(r"\w+", p))
    return sorted(words) + [",", ":"]


def build_tokenizer(vocab_words: list[str], max_len: int):
    """A fast word-level tokenizer that wraps each text in <bos> ... <eos>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in vocab_words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", BOS_ID), ("<eos>", EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_len,
    )


def build_clip(spec: TinyClipSpec, vocab_size: int, seed: int = 0):
    """A randomly initialised CLIPModel of the given size."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    text_width = spec.text_width or spec.width
    text = dict(
        vocab_size=vocab_size,
        hidden_size=text_width,
        intermediate_size=4 * text_width,
        num_hidden_layers=spec.text_layers or spec.layers,
        num_attention_heads=spec.heads,
        max_position_embeddings=spec.max_text_len,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    vision = dict(
        hidden_size=spec.width,
        intermediate_size=4 * spec.width,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec.embed_dim)
    torch.manual_seed(seed)
    return CLIPModel(config)


def build_image_processor(spec: TinyClipSpec):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )


def save_checkpoint(model, tokenizer, image_processor, out_dir: str | Path) -> Path:
    """Save model, tokenizer and image processor side by side (the HF layout)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    return out


def make_tiny_clip(out_dir: str | Path, spec: TinyClipSpec = TinyClipSpec(), seed: int = 0) -> Path:
    """An untrained tiny CLIP in the HF layout (tests use it as a stand-in model)."""
    tokenizer = build_tokenizer(world_vocabulary(), spec.max_text_len)
    model = build_clip(spec, len(tokenizer), seed)
    out = save_checkpoint(model, tokenizer, build_image_processor(spec), out_dir)
    (out / "xbt_zoo.json").write_text(json.dumps({"spec": spec.__dict__, "seed": seed, "trained": False}))
    return out
