"""The upgrade bundle: what XBT adds to the new model, and nothing else.

    bundle/
      xbt_bundle.json        base new model, old model, root (gallery) model, dims, method, chain
      phi.safetensors        the head: φ (Sec. 3.2), or a fitted linear map (xbt_bundle.json's "head")
      prompts.safetensors    vision soft prompts (absent when the method has none)
      adapter/               peft LoRA adapter (adapter_config.json, adapter_model.safetensors)
      model/                 full weights, when every encoder weight trained (no adapter to ship)
      old/                   the gallery's model, for a head that blends with the old model's query
      backfill_order.json    the gain model of `xbt backfill`'s learned order (xbtcore.backfill.GainModel),
                             fitted on the upgrade's validation pairs (absent without them)
      base/                  the base new model's files (hard links where the filesystem
                             allows): from its local directory, or for a hub id from the
                             Hugging Face cache's snapshot. A registered bundle must still
                             load after that directory moves or the cache is cleared.
                             A hub id that is not in the cache stays a reference.

Loaded, it gives bit-identical embeddings to the in-memory model. With the
adapters switched off (`adapters_off`) it is the original new model exactly.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .adapters import add_vision_prompts, find_prompts
from .phi import HEADS, PhiConfig, head_kind

BUNDLE_FILE = "xbt_bundle.json"
GAIN_FILE = "backfill_order.json"
BUNDLE_VERSION = 2
READS_VERSIONS = (1, 2)  # version 1 had no "head": its kind shows in phi.safetensors (a lone "weight" is linear)


@dataclass
class BundleMeta:
    base_model: str  # the new model the adapters sit on (REF)
    old_model: str  # the model this link was made compatible with (REF or bundle)
    root_model: str  # the model the gallery was embedded with (first link of a chain)
    method: str
    phi: dict  # PhiConfig fields of the head
    head: str = "phi"  # the head's kind, a key of phi.HEADS
    n_prompts: int = 0
    chain: list[str] = field(default_factory=list)  # base models from the root onwards
    version: int = BUNDLE_VERSION


def is_bundle(ref: str | os.PathLike) -> bool:
    return (Path(ref) / BUNDLE_FILE).is_file()


def read_gain(bundle_dir: str | Path):
    """The bundle's backfill gain model (xbtcore.backfill.GainModel), or None where it has none."""
    from .backfill import GainModel

    path = Path(bundle_dir) / GAIN_FILE
    if not path.is_file():
        return None
    try:
        return GainModel.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a backfill gain model ({e}): remove it, or publish the bundle again") from e


def save_bundle(
    out_dir: str | Path, encoder, phi: torch.nn.Module, meta: BundleMeta, full_weights: bool = False
) -> Path:
    """Write to a sibling temp folder, then rename: no half-written bundle looks finished.
    `phi` is the head (a key of phi.HEADS); meta.head and meta.phi are set from it. full_weights:
    every encoder weight was trained, so the bundle carries the whole checkpoint."""
    meta.head, meta.phi = head_kind(phi), asdict(phi.cfg)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in phi.state_dict().items()}, tmp / "phi.safetensors")
    prompts = find_prompts(encoder.model)
    if prompts is not None:
        save_file({"prompts": prompts.prompts.detach().cpu().contiguous()}, tmp / "prompts.safetensors")
    if hasattr(encoder.model, "peft_config"):
        encoder.model.save_pretrained(tmp / "adapter")
        _sort_target_modules(tmp / "adapter" / "adapter_config.json")
    elif full_weights:  # weights, tokenizer and image processor
        encoder.model.save_pretrained(tmp / "model")
        encoder.tokenizer.save_pretrained(tmp / "model")
        encoder.image_processor.save_pretrained(tmp / "model")
    files = None if (tmp / "model").exists() else _base_files(meta.base_model)
    if files is not None:
        shutil.copytree(files, tmp / "base", copy_function=carry_file, ignore=_NOT_LOADED)
    old_files = _base_files(meta.root_model) if phi.blends else None  # a blending head's queries run the old model
    if old_files is not None:
        shutil.copytree(old_files, tmp / "old", copy_function=carry_file, ignore=_NOT_LOADED)
    (tmp / BUNDLE_FILE).write_text(json.dumps(asdict(meta), indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _sort_target_modules(config: Path) -> None:
    """peft writes target_modules from a set, in an order that changes from process to process: sorted,
    the same training writes the same bundle, byte for byte (and so the same registry version)."""
    d = json.loads(config.read_text())
    if isinstance(d.get("target_modules"), list):
        d["target_modules"] = sorted(d["target_modules"])
        config.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def _base_files(ref: str) -> Path | None:
    """The folder that holds the base model's files: its local directory, or the
    Hugging Face cache's snapshot of a hub id (symlinks into the cache's blobs,
    followed when carried). None when neither exists: the REF stays a reference."""
    if Path(ref).is_dir():
        return Path(ref)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, local_files_only=True))
    except Exception:  # not cached, or not a hub id at all
        return None


# What a Hugging Face checkpoint folder may hold that the torch loader never reads.
_NOT_LOADED = shutil.ignore_patterns(".git", ".cache", "*.msgpack", "*.h5", "*.onnx", "*.ot", "*.tflite", "*.lock")


_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth")


def carry_file(src: str, dst: str) -> None:
    """A model's file into a bundle: weights hard-linked (save_pretrained writes them as new files, so a
    checkpoint saved again in its folder leaves the bundle's alone), the small files copied (save_pretrained
    rewrites config, tokenizer and image processor files in place, which would reach through a link)."""
    if src.endswith(_WEIGHTS):
        link_or_copy(src, dst)
    else:
        shutil.copy2(src, dst)


def link_or_copy(src: str, dst: str) -> None:
    """A hard link costs no space; another filesystem (or one without links) gets a copy.
    A symlink (the hub cache's snapshot files) is resolved first: os.link would link the
    symlink itself, which dangles once it sits in the bundle."""
    try:
        os.link(os.path.realpath(src), dst)
    except OSError:
        shutil.copy2(src, dst)


def blend_weights(bundle_dir: str | Path) -> dict[str, float] | None:
    """α of a head that blends with the old model's own query, per query direction ({"t2i": text queries',
    "i2t": image queries'}; 1 is the mapped new query alone, 0 the old model's), or None for a head without."""
    from safetensors import safe_open

    with safe_open(str(Path(bundle_dir) / "phi.safetensors"), "pt") as f:
        if "alpha" not in f.keys():
            return None
        alpha = f.get_tensor("alpha").reshape(-1).tolist()  # SlerpHead: one for both; BlendHead: text, image
    return {"t2i": round(alpha[0], 4), "i2t": round(alpha[-1], 4)}


def read_meta(bundle_dir: str | Path) -> BundleMeta:
    path = Path(bundle_dir) / BUNDLE_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path}: not a readable xbt bundle ({e}); pass the DIR/bundle folder written by `xbt upgrade`"
        ) from e
    if raw.get("version") not in READS_VERSIONS:
        raise ValueError(
            f"{path}: bundle version {raw.get('version')} is not supported (this xbt reads {READS_VERSIONS})"
        )
    if "head" not in raw:
        keys = load_file(Path(bundle_dir) / "phi.safetensors").keys()
        raw["head"] = "linear" if set(keys) == {"weight"} else "phi"
    return BundleMeta(**raw)


def base_encoder(bundle_dir: Path, meta: BundleMeta, device="cpu", dtype: torch.dtype = torch.float32):
    """The new model a bundle's adapters sit on: the weights it carries (full-tuned, or its
    copy of a local base model) or else the REF it names."""
    from .encoders import DualEncoder

    own = next((bundle_dir / d for d in ("model", "base") if (bundle_dir / d).is_dir()), None)
    if own is None:
        return DualEncoder.from_pretrained(meta.base_model, device=device, dtype=dtype)
    base = DualEncoder.from_pretrained(str(own), device=device, dtype=dtype)
    base.ref = meta.base_model  # the name it was trained from, for reports and cache keys
    return base


def original_encoder(bundle_dir: Path, meta: BundleMeta, device="cpu", dtype: torch.dtype = torch.float32):
    """The new model as it was before the upgrade, whose space a backfill embeds into (`orig-new/new`):
    the base the bundle's adapters sit on; a full-tune bundle carries only the tuned weights, so the REF
    it was trained from, which must still load."""
    from .encoders import DualEncoder, ModelLoadError

    if not (bundle_dir / "model").is_dir():
        return base_encoder(bundle_dir, meta, device, dtype)
    try:
        return DualEncoder.from_pretrained(meta.base_model, device=device, dtype=dtype)
    except ModelLoadError as e:
        raise ModelLoadError(
            f"{bundle_dir} is a full-tune bundle: its weights are the tuned ones, and the new model it was tuned "
            f"from, {meta.base_model}, does not load ({e}): restore that model, or pass it as the new model"
        ) from e


def load_compatible(bundle_dir: str | Path, device="cpu", dtype: torch.dtype = torch.float32):
    """-> (CompatibleEncoder, BundleMeta) for a bundle of any method: the base new model through
    the one loader, its adapters, and its head."""
    from peft import PeftModel

    bundle_dir = Path(bundle_dir)
    meta = read_meta(bundle_dir)
    needed = ["phi.safetensors"] + (["prompts.safetensors"] if meta.n_prompts else [])
    missing = [f for f in needed if not (bundle_dir / f).is_file()]
    if missing:
        raise ValueError(
            f"{bundle_dir}: a broken xbt bundle, {' and '.join(missing)} missing; run the `xbt upgrade` that wrote "
            "it again (its cached steps publish the bundle whole) or pass another bundle"
        )
    base = base_encoder(bundle_dir, meta, device, dtype)
    if meta.n_prompts:
        emb = add_vision_prompts(base.model, meta.n_prompts)
        with torch.no_grad():
            emb.prompts.copy_(load_file(bundle_dir / "prompts.safetensors")["prompts"])
    if (bundle_dir / "adapter").is_dir():
        base.model = PeftModel.from_pretrained(base.model, bundle_dir / "adapter")
    base.model.to(device).eval()
    phi = HEADS[meta.head](PhiConfig(**meta.phi))
    phi.load_state_dict(load_file(bundle_dir / "phi.safetensors"))
    phi.to(device).eval()
    old = None
    if phi.blends:
        from .encoders import DualEncoder

        own = bundle_dir / "old"
        old = DualEncoder.from_pretrained(str(own) if own.is_dir() else meta.root_model, device=device, dtype=dtype)
    return CompatibleEncoder(base, phi, ref=str(bundle_dir), old=old), meta


class CompatibleEncoder:
    """The upgraded new model as a query encoder into the old space: φ(normalize(E_new(x))), or for a
    head that blends (`head.blends`) φ(normalize(E_new(x)), E_old(x)) with the old encoder `old`."""

    compatible = True  # embeds into the old space (the embedding cache keys it apart from its base model)

    def __init__(self, encoder, phi: torch.nn.Module, ref: str | None = None, old=None):
        assert (old is not None) == bool(getattr(phi, "blends", False)), "a blending head needs the old encoder"
        self.encoder = encoder  # DualEncoder of the new model, adapters installed
        self.phi = phi  # the head: φ, or a fitted map
        self.old = old  # DualEncoder of the old model, for a blending head
        self.ref = ref or f"{encoder.ref}+compat"  # a bundle's path when loaded from one

    @property
    def embed_dim(self) -> int:
        return self.phi.cfg.out_dim

    @property
    def dtype(self) -> torch.dtype:
        """The new encoder's (the precision of its passes)."""
        return self.encoder.dtype

    @property
    def compile_after(self) -> int | None:
        """After how many items its encoders' passes run torch.compile'd (DualEncoder.compile_after)."""
        return self.encoder.compile_after

    @compile_after.setter
    def compile_after(self, items: int | None) -> None:
        for encoder in (self.encoder, self.old):
            if encoder is not None:
                encoder.compile_after = items

    def _runs_old(self, modality: str) -> bool:
        """Whether `modality`'s queries run the old encoder (a blending head that blends them)."""
        return self.old is not None and self.phi.needs_old(modality)

    def _map(self, new_emb: torch.Tensor, old_emb: torch.Tensor | None, modality: str, batch_size: int = 8192):
        device = next(itertools.chain(self.phi.parameters(), self.phi.buffers())).device
        blend = {"modality": modality} if self.old is not None else {}
        out = []
        with torch.inference_mode():
            for i in range(0, len(new_emb), batch_size):
                extra = () if old_emb is None else (old_emb[i : i + batch_size].to(device),)
                out.append(self.phi(new_emb[i : i + batch_size].to(device), *extra, **blend).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    def embed_texts(self, texts, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """(N,) texts -> (N, D_old) compatible embeddings, L2-normalised (the head normalises)."""
        old = self.old.embed_texts(texts, batch_size, progress) if self._runs_old("text") else None
        return self._map(self.encoder.embed_texts(texts, batch_size, progress), old, "text")

    def embed_images(self, images, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        old = self.old.embed_images(images, batch_size, progress) if self._runs_old("image") else None
        return self._map(self.encoder.embed_images(images, batch_size, progress), old, "image")
