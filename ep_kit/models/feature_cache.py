"""On-disk cache of frozen encoder outputs (audio tower, vision tower), one safetensors file per sample.

Why: with ``freeze_encoders: true`` the audio and vision encoders compute the same features for the
same clip in every epoch, every training row of a table and every budget -- about 43% of the
end-to-end FLOPs at real scale. With a cache, only the first run over a clip pays for them.

Why per sample and not per batch: training loaders shuffle, so a batch composition never repeats;
a clip does. The audio features of a batch are split per audio row (by ``feature_attention_mask``)
and the pixel values per image/video (by the ``grid_thw`` products). Both encoders compute each
item on its own (the audio tower attends within per-sample chunks, the vision tower within
per-item windows and ``cu_seqlens``; ``tests/test_feature_cache.py`` checks it numerically), so a
sample's features do not depend on the other samples of its batch -- except for float rounding:
a matmul over a different number of rows may round differently (about 1e-7 relative in float32).
A cached feature is therefore bit-identical to the no-cache run when it was written from the same
batch composition, and equal up to that rounding (``allclose``) when read into another batch.

The key of a sample is the sha256 of

* the encoder input itself: the processed tensor's bytes, shape and dtype (plus ``grid_thw`` for
  vision). The processor output is a function of the media content AND the processor settings
  (sampling rate, fps, resolution limits, mel settings...), so hashing it covers both, and nothing
  about file names or recipe fields can go stale;
* a digest of the encoder: every parameter and buffer (names, dtypes, shapes, bytes) and its
  config (window sizes etc. change outputs without changing weight shapes). It is computed once per
  encoder instance and memoised; the memo is keyed by the tensors' storage and in-place version
  counters, so loading other weights (``load_state_dict``, ``init_from``), ``.to(...)`` or any
  in-place update recomputes it;
* the encoder kind (``audio`` / ``image`` / ``video``), the transformers and torch versions, the
  device type, the autocast dtype and the float32 matmul precision (all change the numbers an
  encoder produces).

Any change to one of these gives a new key, so a stale entry is never read (it is merely unused).

Concurrency: a file is written to a unique temporary name in its final directory and moved into
place with :func:`os.replace` (atomic on POSIX and Windows), so readers see either no file or a whole
one; workers racing on one key each write a valid entry (equal up to the rounding above) and the last
rename wins. A file that fails to load or does not have the expected shape (a truncated copy, a disk
error) counts as a miss and is rewritten.

Size: one file holds ``tokens x hidden`` features in the encoder's output dtype, e.g. about 3 MB of
audio and tens of MB of video per 30 s clip for the 3B model in bf16. Nothing is evicted: delete the
directory to reclaim the space (always safe).

Only used where it cannot change training: when no encoder parameter requires grad (or under
``torch.no_grad``), the encoder is not in training mode with dropout, and its weights can be read
whole (not sharded: under FSDP / ZeRO-3 the cache steps aside). :class:`~ep_kit.models.omni.OmniThinker`
also bypasses it for audio when OmniZip's audio-salience probe needs the audio tower to run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn

log = logging.getLogger(__name__)

#: bump when the file layout or the key recipe changes (old entries are then simply not found).
FORMAT = "1"
#: config fields that name where a config came from, not what the encoder computes.
_CONFIG_NOISE = ("_name_or_path", "_commit_hash", "transformers_version", "architectures")
_DROPOUT_FIELDS = ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout")


def _tensor_bytes(t: Tensor) -> memoryview:
    """The raw bytes of ``t`` (on the CPU, contiguous), any dtype (bf16 included)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _update(h: Any, name: str, t: Tensor) -> None:
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(_tensor_bytes(t))


def split_audio(features: Tensor, feature_mask: Tensor) -> list[Tensor]:
    """``(n_mel, T_i)`` frames each audio row feeds the audio tower (padding dropped by its mask)."""
    keep = feature_mask.bool()
    lens = keep.sum(-1)
    if bool((keep == (torch.arange(keep.shape[-1], device=keep.device) < lens[:, None])).all()):
        # Prefix masks (what the processor and collate_av produce): slices, no boolean gather per row.
        return [features[i, :, :n] for i, n in enumerate(lens.tolist())]
    return [features[i][:, keep[i]] for i in range(features.shape[0])]


def pack_audio(items: Sequence[Tensor], mask_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Right-pad ``(n_mel, T_i)`` rows back into ``(input_features, feature_attention_mask)``."""
    width = max(int(t.shape[-1]) for t in items)
    feats = items[0].new_zeros((len(items), items[0].shape[0], width))
    mask = torch.zeros((len(items), width), dtype=mask_dtype, device=items[0].device)
    for i, t in enumerate(items):
        feats[i, :, : t.shape[-1]] = t
        mask[i, : t.shape[-1]] = 1
    return feats, mask


def audio_output_lengths(feature_mask: Tensor) -> list[int]:
    """Tokens the audio tower returns per audio row (its two stride-2 steps, as transformers counts them)."""
    lens = feature_mask.sum(-1).long()
    after_cnn = (lens - 1) // 2 + 1
    return ((after_cnn - 2) // 2 + 1).tolist()


def split_pixels(pixels: Tensor, grid_thw: Tensor) -> list[Tensor]:
    """Patch rows of each image/video (``grid_thw.prod(-1)`` rows each, in order)."""
    return list(torch.split(pixels, grid_thw.prod(-1).tolist()))


class EncoderFeatureCache:
    """Per-sample on-disk cache of the frozen audio / vision encoder outputs (see the module doc).

    Args:
        root: directory of the cache (created when first written). Files live at
            ``root/<kind>/<key[:2]>/<key>.safetensors``. Share one directory between every run
            that uses the same encoder (table rows, budgets, seeds): entries of other weights or
            other processor settings never collide, they have other keys. Deleting it is always safe.

    In YAML (``model.feature_cache``)::

        feature_cache:
          class_path: ep_kit.models.feature_cache.EncoderFeatureCache
          init_args:
            root: .cache/ep-kit/encoder-features

    ``stats`` counts hits, misses (encoded), writes, unreadable files and bypassed batches in this
    process.
    """

    def __init__(self, root: str) -> None:
        self.root = Path(root)
        self.stats = {"hits": 0, "misses": 0, "writes": 0, "corrupt": 0, "bypassed": 0}
        self._digests: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str | None]] = weakref.WeakKeyDictionary()
        self._write_warned = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r})"

    # Pickling / deepcopy (DDP spawn, checkpoint tooling): the memo is per process.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_digests"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._digests = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ keys
    def encoder_digest(self, encoder: nn.Module) -> str | None:
        """sha256 of the encoder's parameters, buffers and config; None when its weights are sharded.

        Memoised per encoder; recomputed when a tensor's storage or in-place version changes.
        """
        # Every parameter and buffer, persistent or not (a non-persistent buffer such as a rotary table
        # is outside state_dict but still shapes the output).
        tensors = [*encoder.named_parameters(), *encoder.named_buffers()]
        try:
            signature = tuple((n, t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for n, t in tensors)
        except RuntimeError:  # inference tensors carry no version counter: never memoise them
            signature = None
        memo = self._digests.get(encoder)
        if signature is not None and memo is not None and memo[0] == signature:
            return memo[1]
        digest = self._compute_digest(encoder, tensors)
        if signature is not None:
            self._digests[encoder] = (signature, digest)
        return digest

    @staticmethod
    def _compute_digest(encoder: nn.Module, tensors: list[tuple[str, Tensor]]) -> str | None:
        params = list(encoder.parameters())
        if not params or any(p.numel() == 0 or type(p.data) is not torch.Tensor for p in params):
            return None  # sharded (ZeRO-3 placeholders, FSDP DTensors): this rank cannot see the weights
        h = hashlib.sha256()
        h.update(type(encoder).__qualname__.encode())
        config = getattr(encoder, "config", None)
        if config is not None:
            fields = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_NOISE}
            fields["attn_implementation"] = getattr(config, "_attn_implementation", None)
            h.update(json.dumps(fields, sort_keys=True, default=str).encode())
        for name, t in tensors:
            _update(h, name, t)
        return h.hexdigest()

    @staticmethod
    def _numerics(device: torch.device) -> str:
        """What else changes an encoder's numbers: versions, device type, autocast dtype, fp32 matmul mode."""
        autocast = (
            str(torch.get_autocast_dtype(device.type)) if torch.is_autocast_enabled(device.type) else "off"
        )
        return (
            f"transformers={transformers.__version__}|torch={torch.__version__}|device={device.type}|"
            f"autocast={autocast}|matmul={torch.get_float32_matmul_precision()}"
        )

    def sample_key(self, kind: str, digest: str, numerics: str, item: Tensor, grid: Tensor | None = None) -> str:
        """sha256 over the format, ``kind``, the encoder digest, ``numerics`` and the processed input (+ grid)."""
        h = hashlib.sha256()
        h.update(f"ep-kit-encoder-cache/{FORMAT}|{kind}|{digest}|{numerics}|".encode())
        _update(h, "input", item)
        if grid is not None:
            _update(h, "grid", grid.long())
        return h.hexdigest()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    # --------------------------------------------------------------- storage
    def load(self, kind: str, key: str, rows: int) -> Tensor | None:
        """The stored features of ``key`` (``rows`` tokens), or None: absent, unreadable or wrong shape."""
        from safetensors import safe_open

        path = self.path(kind, key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                features = f.get_tensor("features")
            if meta.get("key") != key or features.ndim != 2 or features.shape[0] != rows:
                raise ValueError(f"holds {tuple(features.shape)} for key {meta.get('key')!r}")
        except Exception as err:  # truncated / corrupt / foreign file: a miss, rewritten below
            self.stats["corrupt"] += 1
            log.warning("encoder feature cache: ignoring unreadable %s (%s: %s)", path, type(err).__name__, err)
            return None
        return features

    def store(self, kind: str, key: str, features: Tensor) -> None:
        """Write ``features`` atomically (temporary file in the same directory, then ``os.replace``).

        A failed write (disk full, read-only directory) only warns: the cache is an optimisation.
        """
        from safetensors.torch import save_file

        path = self.path(kind, key)
        tmp = path.with_name(f".{key}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(
                {"features": features.detach().to("cpu").contiguous()},
                str(tmp),
                metadata={"key": key, "kind": kind, "format": FORMAT},
            )
            os.replace(tmp, path)
            self.stats["writes"] += 1
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if not self._write_warned:
                self._write_warned = True
                warnings.warn(f"encoder feature cache: cannot write under {self.root} ({err}); "
                              "features are recomputed", stacklevel=2)

    # ----------------------------------------------------------------- usage
    def usable(self, encoder: nn.Module) -> bool:
        """Whether cached features can stand in for running ``encoder`` now (see the module doc)."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return False
        if torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters()):
            return False
        config = getattr(encoder, "config", None)
        if encoder.training and any(float(getattr(config, f, 0.0) or 0.0) > 0 for f in _DROPOUT_FIELDS):
            return False  # stochastic outputs: nothing to reuse
        return True

    def _features(
        self,
        kind: str,
        encoder: nn.Module,
        items: list[Tensor],
        grids: list[Tensor | None],
        rows: list[int],
        encode: Callable[[list[int]], Tensor],
    ) -> Tensor | None:
        """Look every item up; encode the missing ones in ONE call (``encode(indices)``), store them.

        Returns the features of all items concatenated in order, or None when the cache cannot be
        used (the caller runs the encoder as usual).
        """
        digest = self.encoder_digest(encoder)
        if digest is None:
            self.stats["bypassed"] += 1
            return None
        numerics = self._numerics(items[0].device)
        keys = [self.sample_key(kind, digest, numerics, t, g) for t, g in zip(items, grids, strict=True)]
        found = [self.load(kind, k, n) for k, n in zip(keys, rows, strict=True)]
        missing = [i for i, f in enumerate(found) if f is None]
        self.stats["hits"] += len(items) - len(missing)
        self.stats["misses"] += len(missing)
        device = items[0].device
        parts: list[Tensor | None] = [None if f is None else f.to(device) for f in found]
        if missing:
            fresh = encode(missing)
            chunks = torch.split(fresh, [rows[i] for i in missing])
            for i, chunk in zip(missing, chunks, strict=True):
                self.store(kind, keys[i], chunk)
                parts[i] = chunk
        return torch.cat([p for p in parts if p is not None], dim=0)

    def audio_features(self, model: nn.Module, features: Tensor, feature_mask: Tensor) -> Tensor | None:
        """``model.get_audio_features(...).last_hidden_state`` through the cache (None: not usable now).

        ``model`` is the thinker's inner model (``thinker.model``, with ``audio_tower``).
        """
        tower = model.audio_tower
        if not self.usable(tower):
            self.stats["bypassed"] += 1
            return None
        items = split_audio(features, feature_mask)
        if not items:
            return None

        def encode(idx: list[int]) -> Tensor:
            if len(idx) == len(items):  # nothing cached: the batch exactly as given
                feats, mask = features, feature_mask
            else:
                feats, mask = pack_audio([items[i] for i in idx], feature_mask.dtype)
            return model.get_audio_features(feats, mask, return_dict=True).last_hidden_state

        rows = audio_output_lengths(feature_mask)
        return self._features("audio", tower, items, [None] * len(items), rows, encode)

    def vision_features(
        self, model: nn.Module, kind: str, pixels: Tensor, grid_thw: Tensor, getter: Callable[..., Any]
    ) -> Tensor | None:
        """``cat(getter(pixels, grid_thw).pooler_output)`` through the cache (None: not usable now).

        ``kind`` is ``image`` or ``video``; ``getter`` the model's ``get_image_features`` /
        ``get_video_features``.
        """
        visual = model.visual
        if not self.usable(visual):
            self.stats["bypassed"] += 1
            return None
        items = split_pixels(pixels, grid_thw)
        if not items:
            return None
        grids = list(grid_thw)
        merge = int(visual.spatial_merge_size) ** 2
        rows = (grid_thw.prod(-1) // merge).tolist()

        def encode(idx: list[int]) -> Tensor:
            if len(idx) == len(items):
                pix, grid = pixels, grid_thw
            else:
                pix, grid = torch.cat([items[i] for i in idx]), grid_thw[idx]
            return torch.cat(getter(pix, grid, return_dict=True).pooler_output, dim=0)

        return self._features(kind, visual, items, grids, rows, encode)
