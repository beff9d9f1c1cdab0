"""One loader and one feature interface for every dual encoder transformers loads.

CLIP, SigLIP and BLIP retrieval checkpoints differ only in where their projected
features come from; that difference lives in the "per-family feature access"
section below and nowhere else. Everything else (batching, padding, autocast,
normalisation) is shared.

`text_features` / `image_features` are differentiable and return the projected,
not normalised, features: training (LoRA, XBT) builds on them. `embed_texts` /
`embed_images` are the inference path: batched, no grad, L2-normalised, float32
on the CPU.
"""

from __future__ import annotations

import os
import re
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .data import to_rgb

# Files a local checkpoint directory must hold for AutoModel to load it.
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Architectures AutoModel would load as a different class (losing the heads we need).
_ARCHITECTURE_CLASSES = {"BlipForImageTextRetrieval"}
# Tokenizer files; without any, transformers 5 quietly builds an empty tokenizer.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
_MIN_VOCAB = 8
_HUB_TIMEOUT_S = "10"


class ModelLoadError(RuntimeError):
    """A model reference that cannot be loaded; the message names it and the fix."""


# --- per-family feature access ------------------------------------------------


def _is_blip_retrieval(model) -> bool:
    # BlipForImageTextRetrieval has no get_*_features: its contrastive (ITC)
    # features are vision_proj / text_proj on the CLS token of each tower.
    # hasattr also sees through a peft wrapper.
    return all(hasattr(model, a) for a in ("vision_proj", "text_proj", "text_encoder"))


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected
    # feature; older versions (and some families) return the tensor itself.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _project_text(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if _is_blip_retrieval(model):
        hidden = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return model.text_proj(hidden[:, 0, :])  # (B, D)
    return _pooled(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))  # (B, D)


def _project_image(model, pixel_values: torch.Tensor) -> torch.Tensor:
    if _is_blip_retrieval(model):
        hidden = model.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, P+1, H)
        return model.vision_proj(hidden[:, 0, :])  # (B, D)
    return _pooled(model.get_image_features(pixel_values=pixel_values))  # (B, D)


def _check_dual_encoder(model, ref: str) -> None:
    """A ModelLoadError naming `ref` unless its model embeds texts and images the way this module reads them."""
    kind = getattr(model.config, "model_type", "") or type(model).__name__
    if kind == "siglip2":
        raise ModelLoadError(
            f"model '{ref}' is SigLIP 2, whose image tower takes patches at each image's own resolution "
            "(pixel_attention_mask, spatial_shapes), which xbt's image batches do not carry: "
            "pass a CLIP, SigLIP or BLIP retrieval checkpoint"
        )
    if not (_is_blip_retrieval(model) or all(hasattr(model, f) for f in ("get_text_features", "get_image_features"))):
        raise ModelLoadError(
            f"model '{ref}' ({kind}) is not a dual encoder with text and image features: "
            "pass a CLIP, SigLIP or BLIP retrieval checkpoint"
        )


def _config_embed_dim(model) -> int | None:
    config = model.config
    if _is_blip_retrieval(model):
        return config.image_text_hidden_size
    if getattr(config, "projection_dim", None):  # CLIP, ALIGN, BLIP (BlipModel), ...
        return config.projection_dim
    text_config = getattr(config, "text_config", None)
    return getattr(text_config, "projection_size", None)  # SigLIP


CHARS_PER_TOKEN = 16  # a text past this many characters per token the tower reads is tokenized from a prefix
_LAST_SPACE = re.compile(r"\s\S*$")


def clip_long_texts(tokenizer, texts: list[str], max_length: int) -> list[str]:
    """`texts`, each one longer than CHARS_PER_TOKEN * max_length characters cut at the last white space
    before that, where the cut text still holds max_length tokens: a tokenizer reads a whole text before it
    truncates (a 300,000-character text took 2 GB and minutes), and a prefix of whole words that fills
    the tower tokenizes to the same first max_length tokens. Any other text is kept whole."""
    limit = CHARS_PER_TOKEN * max_length
    cuts = {}
    for i, text in enumerate(texts):
        if len(text) > limit and (space := _LAST_SPACE.search(text, 0, limit)) is not None and space.start() > 0:
            cuts[i] = text[: space.start()]
    if not cuts:
        return texts
    ids = tokenizer(list(cuts.values()), truncation=True, max_length=max_length)["input_ids"]
    out = list(texts)
    for (i, cut), filled in zip(cuts.items(), ids):
        if len(filled) >= max_length:
            out[i] = cut
    return out


def _pads_to_max_length(model) -> bool:
    # SigLIP pools the last position of the text tower and was trained on texts
    # padded to the full length: dynamic padding would change its features.
    return getattr(model.config, "model_type", "") == "siglip"


# --- loading ------------------------------------------------------------------


def _is_offline() -> bool:
    return any(
        os.environ.get(k, "").strip().lower() in {"1", "true", "yes", "on"}
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def check_model_dir(path: Path, need_model: bool = True) -> None:
    """A local model folder holds a config, weights and tokenizer files; else a ModelLoadError naming the fix."""
    if need_model and not (path / "config.json").is_file():
        raise ModelLoadError(
            f"model directory '{path}' has no config.json: pass a directory in the Hugging Face layout "
            "(config.json, weights, tokenizer, image processor), e.g. one written by save_pretrained"
        )
    if need_model and not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise ModelLoadError(
            f"model directory '{path}' has no weights ({' or '.join(_WEIGHT_FILES)}): "
            "save the model there with save_pretrained"
        )
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"model directory '{path}' has no tokenizer files ({', '.join(_TOKENIZER_FILES)}): "
            "save the tokenizer there with tokenizer.save_pretrained"
        )


def _uncached_offline(ref: str) -> ModelLoadError:
    return ModelLoadError(
        f"model '{ref}' is not a local directory and is not in the Hugging Face cache; "
        "the hub is unreachable (HF_HUB_OFFLINE=1): "
        "download it where the hub is reachable or pass a local directory"
    )


def check_hub_ref(ref: str) -> None:
    """Offline, a hub id whose config is not in the local Hugging Face cache fails in seconds, before any
    server starts or model loads (online, loading it is what tells)."""
    if not _is_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(ref, "config.json")
    except Exception:  # not a valid repo id: not cached either
        cached = None
    if not isinstance(cached, str):
        raise _uncached_offline(ref)


class _PartError(Exception):
    """One part (model, tokenizer, image processor) failed to load."""

    def __init__(self, part: str, cause: BaseException):
        super().__init__(part)
        self.part, self.cause, self.reason = part, cause, _first_line(cause)


def _load_parts(ref: str, dtype: torch.dtype, with_model: bool, local_files_only: bool):
    """(model or None, tokenizer, image_processor); each failure names the part."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    kw = dict(local_files_only=local_files_only)
    model = None
    if with_model:
        try:
            config = AutoConfig.from_pretrained(ref, **kw)
            archs = [a for a in (getattr(config, "architectures", None) or []) if a in _ARCHITECTURE_CLASSES]
            cls = getattr(transformers, archs[0]) if archs else AutoModel
            model = cls.from_pretrained(ref, config=config, dtype=dtype, **kw)
        except Exception as e:
            raise _PartError("model", e) from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, **kw)
        if len(tokenizer) < _MIN_VOCAB:
            raise ValueError(f"the tokenizer has only {len(tokenizer)} tokens (its vocabulary files are missing)")
        if tokenizer.pad_token is None:  # batches of captions are padded; guessing a pad token could change the model
            raise ValueError("the tokenizer has no pad token (set pad_token in its tokenizer_config.json)")
    except Exception as e:
        raise _PartError("tokenizer", e) from e
    try:
        image_processor = AutoImageProcessor.from_pretrained(ref, **kw)
    except Exception as e:
        raise _PartError("image processor", e) from e
    return model, tokenizer, image_processor


def _hub_reachable() -> str | None:
    """None when the hub answers, else the reason. One request, no retries:
    huggingface_hub's own downloads retry with backoff for ~30 s per file."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=float(os.environ.get("HF_HUB_ETAG_TIMEOUT", _HUB_TIMEOUT_S)))
    except Exception as e:
        return _first_line(e)
    return None


def _load(ref: str, dtype: torch.dtype, with_model: bool):
    # Short hub timeouts so a dead network fails fast. huggingface_hub reads them
    # at import, so set them before the first transformers import (its default is
    # 10 s as well, so an earlier import loses nothing).
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", _HUB_TIMEOUT_S)
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", _HUB_TIMEOUT_S)
    path = Path(ref).expanduser()
    if path.is_dir():
        check_model_dir(path, with_model)
        try:
            return _load_parts(str(path), dtype, with_model, local_files_only=True)
        except _PartError as e:
            raise ModelLoadError(
                f"cannot load the {e.part} from model directory '{path}' ({e.reason}): "
                "save model, tokenizer and image processor there with save_pretrained"
            ) from e.cause
    if path.exists():
        raise ModelLoadError(
            f"model '{ref}' is a file, not a directory: pass a directory in the Hugging Face layout or a hub id"
        )
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:  # a path, not an "org/name" hub id
        raise ModelLoadError(
            f"model directory '{ref}' does not exist: pass a directory in the Hugging Face layout or a hub id"
        )

    # A hub id: the local cache first, so a cached model never touches the network.
    try:
        return _load_parts(ref, dtype, with_model, local_files_only=True)
    except _PartError:
        pass
    if _is_offline():
        raise _uncached_offline(ref)
    reason = _hub_reachable()
    if reason is not None:
        raise ModelLoadError(
            f"model '{ref}' is not a local directory and is not in the Hugging Face cache; "
            f"the hub is unreachable ({reason}): download it where the hub is reachable or pass a local directory"
        )
    try:
        return _load_parts(ref, dtype, with_model, local_files_only=False)
    except _PartError as e:
        raise ModelLoadError(
            f"cannot load the {e.part} for model '{ref}' from the Hugging Face hub ({e.reason}): "
            "check the model id (and HF_TOKEN for gated models) or pass a local directory"
        ) from e.cause


# --- device and precision -----------------------------------------------------

# The frozen passes' precision (embedding the corpus, the pairs, the eval set, a gallery); at bf16 training's
# encoder forward pass runs under autocast too, its weights, φ and loss kept float32.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEVICE_HELP = "auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda or cuda:N"
PRECISION_HELP = (
    "of the frozen passes and of training's encoder forward (autocast): auto (bf16 on a GPU, fp32 on the CPU), "
    "fp32 or bf16 (on a CPU with AMX or AVX512-BF16 several times faster at CLIP's sizes: docs/benchmarks.md)"
)


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; a named device is checked against this machine.
    ValueError naming the value and the fix."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device: use {DEVICE_HELP}") from e
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported: use {DEVICE_HELP}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r}: torch {torch.__version__} sees no CUDA GPU on this machine; use cpu or auto"
            )
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return str(d)


# Shapes a compiled pass meets: texts padded up to a multiple of this many tokens, batches up to a power of two.
LENGTH_STEP = 8
DECODE_CHUNK = 16  # images decoded and preprocessed at once within a batch (their full-size pixels are the peak)
# --compile auto on a GPU compiles an encoder's passes once it has embedded this many items: a corpus or a
# large gallery is compiled after its first shards; the validation and eval sets and small galleries embed
# plain rather than wait for a tower's compilations.
COMPILE_AFTER_ITEMS = 100_000
COMPILE_HELP = (
    "torch.compile the frozen embedding passes (texts padded to a multiple of 8 tokens and batches to a "
    f"power of two, so each tower compiles a few shapes once): auto (on a GPU, once a model has embedded "
    f"{COMPILE_AFTER_ITEMS:,} items), on (every pass) or off (docs/method.md)"
)


def resolve_compile(compile: str | int | None, device: str) -> int | None:
    """--compile's value -> `DualEncoder.compile_after`: 'auto' -> COMPILE_AFTER_ITEMS on a CUDA device, None
    on the CPU; 'on' -> 0 (every pass); 'off' -> None; an int or None (already settled) as it is.
    ValueError naming the value and the choices."""
    if compile is None or (isinstance(compile, int) and not isinstance(compile, bool) and compile >= 0):
        return compile
    if compile == "auto":
        return COMPILE_AFTER_ITEMS if torch.device(device).type == "cuda" else None
    if compile not in ("on", "off"):
        raise ValueError(f"compile {compile!r} is not one of auto, on, off")
    return 0 if compile == "on" else None


def _bucket(n: int, cap: int, step: int | None = None) -> int:
    """n rounded up to a multiple of `step` (else to a power of two), at most `cap`."""
    up = -(-n // step) * step if step else 1 << max(n - 1, 0).bit_length()
    return max(n, min(cap, up))


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x with copies of its first row appended up to `rows` (a copy, not a blank row: an all-masked
    text would make attention's softmax NaN)."""
    return x if len(x) >= rows else torch.cat([x, x[:1].expand(rows - len(x), *x.shape[1:])])


def _allow_compiled_shapes() -> None:
    # Every model's feature method is one code object to dynamo; past its recompile limit it would
    # silently run eager. Two towers of two or three models at ~10 lengths and ~9 batch sizes each fit.
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)


def resolve_precision(precision: str, device: str) -> str:
    """'auto' -> 'bf16' on a CUDA device, 'fp32' on the CPU; else one of PRECISIONS (ValueError otherwise)."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of auto, {', '.join(PRECISIONS)}")
    return precision


# --- the dual encoder ---------------------------------------------------------


@dataclass
class DualEncoder:
    """A dual encoder with its tokenizer and image processor.

    `model` may be any module with the family's feature methods, including a
    peft-wrapped one; the constructor does no I/O (use `from_pretrained`).
    """

    model: Any
    tokenizer: Any
    image_processor: Any
    ref: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    # once this many items are embedded (embed_texts / embed_images, all passes counted), the passes run
    # torch.compile'd towers on bucketed shapes; 0: from the first, None: never (resolve_compile, --compile)
    compile_after: int | None = None
    embedded: int = field(default=0, init=False)  # items its passes have embedded
    _compiled_towers: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.device = torch.device(self.device)

    @classmethod
    def from_pretrained(cls, ref: str, device="cpu", dtype: torch.dtype = torch.float32, model=None) -> "DualEncoder":
        """Load model, tokenizer and image processor from a local directory or hub id.

        With `model` given, only the tokenizer and image processor are loaded from
        `ref` (e.g. a peft-wrapped copy of the model in `ref`). Raises
        ModelLoadError, never hangs on an unreachable hub.
        """
        ref = str(ref)
        loaded, tokenizer, image_processor = _load(ref, dtype, with_model=model is None)
        if loaded is not None:
            _check_dual_encoder(loaded, ref)
        model = loaded if model is None else model
        model = model.to(device=device, dtype=dtype).eval()
        return cls(model, tokenizer, image_processor, ref, torch.device(device), dtype)

    # differentiable features (training builds on these)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, D) projected, not normalised, text features."""
        return _project_text(self.model, input_ids, attention_mask)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pixels -> (B, D) projected, not normalised, image features."""
        return _project_image(self.model, pixel_values)

    @property
    def embed_dim(self) -> int:
        dim = _config_embed_dim(self.model)
        if dim is None:
            dim = self.embed_texts(["a"]).shape[1]
        return int(dim)

    @property
    def max_text_length(self) -> int:
        """Truncation length: the tokenizer's, capped by the text tower's positions
        (some tokenizers leave model_max_length at a huge sentinel)."""
        lengths = [self.tokenizer.model_max_length]
        text_config = getattr(self.model.config, "text_config", None)
        if getattr(text_config, "max_position_embeddings", None):
            lengths.append(text_config.max_position_embeddings)
        return int(min(lengths))

    def _compiles(self) -> bool:
        """Whether the next pass runs compiled (`compile_after`)."""
        return self.compile_after is not None and self.embedded >= self.compile_after

    def _forward(self, name: str, compiled: bool, *inputs: torch.Tensor) -> torch.Tensor:
        """Tower `name` ("text" / "image") on `inputs` for the inference passes: compiled once per
        encoder where `compiled`, else the plain forward. Where this machine cannot compile (no C++
        compiler, no Triton), it warns once and goes on without (`compile_after` becomes None)."""
        plain = {"text": self.text_features, "image": self.image_features}[name]
        if not compiled or self.compile_after is None:
            return plain(*inputs)
        if name not in self._compiled_towers:
            _allow_compiled_shapes()
            self._compiled_towers[name] = torch.compile(plain, dynamic=False)
        try:
            return self._compiled_towers[name](*inputs)
        except Exception as e:  # inductor's and dynamo's failures have no common base class
            warnings.warn(
                f"torch.compile of {self.ref}'s {name} tower failed here ({_first_line(e)}); embedding "
                "without it (--compile off skips the attempt)",
                stacklevel=2,
            )
            self.compile_after = None
            return plain(*inputs)

    # preprocessing

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token tensors on the model's device, padded to the longest text (SigLIP:
        to the full length), truncated at `max_text_length`."""
        padding = "max_length" if _pads_to_max_length(self.model) else True
        texts = clip_long_texts(self.tokenizer, list(texts), self.max_text_length)
        enc = self.tokenizer(
            texts, padding=padding, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        )
        return {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask") if k in enc}

    def preprocess_images(self, images) -> torch.Tensor:
        """PIL images -> (B, C, H, W) pixel values (on the CPU, float32)."""
        rgb = [im if im.mode == "RGB" else to_rgb(im) for im in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    # inference (normalised embeddings)

    def _autocast(self):
        if self.dtype == torch.bfloat16:  # CUDA, or a CPU's bf16 units (oneDNN: AMX, AVX512-BF16)
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def embed_texts(self, texts: list[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """(N,) texts -> (N, D) L2-normalised float32 CPU embeddings, in input order.

        Texts are sorted by token length and each batch is padded to its own
        longest text: padding is masked out, so results equal one-at-a-time ones.
        A compiled pass (`compile_after`) pads a batch further, to a multiple of LENGTH_STEP tokens
        and a power of two rows (copies of its first text), so the compiled tower meets
        a few shapes; the extra rows are dropped.
        """
        texts = clip_long_texts(self.tokenizer, list(texts), self.max_text_length)
        # Tokenize once, unpadded; each batch is then only padded (on a GPU the tokenizer is the bottleneck).
        tokens = self.tokenizer(texts, truncation=True, max_length=self.max_text_length)
        keys = [k for k in ("input_ids", "attention_mask") if k in tokens]
        order = sorted(range(len(texts)), key=lambda i: -len(tokens["input_ids"][i]))
        to_max = _pads_to_max_length(self.model)
        compiled = self._compiles()
        chunks = []
        with torch.inference_mode(), self._autocast(), _progress(len(texts), "embed texts", progress) as bar:
            for start in range(0, len(texts), batch_size):
                idx = order[start : start + batch_size]
                length = self.max_text_length if to_max else len(tokens["input_ids"][idx[0]])  # the longest
                if compiled:
                    length = _bucket(length, self.max_text_length, LENGTH_STEP)
                enc = self.tokenizer.pad(
                    {k: [tokens[k][i] for i in idx] for k in keys},
                    padding="max_length",
                    max_length=length,
                    return_tensors="pt",
                )
                rows = _bucket(len(idx), batch_size) if compiled else len(idx)
                enc = {k: _pad_rows(enc[k], rows).to(self.device) for k in keys}
                feats = self._forward("text", compiled, enc["input_ids"], enc.get("attention_mask"))[: len(idx)]
                chunks.append(F.normalize(feats.float(), dim=-1).cpu())
                bar.update(len(idx))
        self.embedded += len(texts)
        if not chunks:
            return torch.empty(0, self.embed_dim)
        sorted_emb = torch.cat(chunks)  # (N, D), in length order
        out = torch.empty_like(sorted_emb)
        out[torch.tensor(order)] = sorted_emb  # back to input order
        return out

    def embed_images(self, images: Sequence, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """(N,) PIL images -> (N, D) L2-normalised float32 CPU embeddings.

        `images` may be any indexable sequence (a lazy one that decodes on access
        works too): at most DECODE_CHUNK images are decoded at once, each resized
        to the model's input size before the next are decoded.
        """
        n = len(images)
        if n == 0:
            return torch.empty(0, self.embed_dim)
        out = None
        compiled = self._compiles()
        with torch.inference_mode(), self._autocast(), _progress(n, "embed images", progress) as bar:
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                # decoded DECODE_CHUNK at a time: 256 decoded 12-megapixel photos alone would take 9 GB
                pixels = torch.cat(
                    [
                        self.preprocess_images([images[i] for i in range(a, min(a + DECODE_CHUNK, stop))])
                        for a in range(start, stop, DECODE_CHUNK)
                    ]
                )  # (b, C, H, W)
                if compiled:
                    pixels = _pad_rows(pixels, _bucket(stop - start, batch_size))
                feats = self._forward("image", compiled, pixels.to(self.device, self.dtype))[: stop - start]
                if out is None:
                    out = torch.empty(n, feats.shape[1])
                out[start:stop] = F.normalize(feats.float(), dim=-1).cpu()
                bar.update(stop - start)
        self.embedded += n
        return out


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal only, not in a log file or a Prefect worker's log
    return tqdm(total=total, desc=desc, unit="item", disable=None if enabled else True)
