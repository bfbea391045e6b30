"""One place to resolve, identify, read and validate model weights.

A weight reference (`ref`) is one of:

* ``None``: random initialisation (tests, the CPU demo, throughput benchmarks);
* a local file or directory path (``/ckpt/sam_vit_b.pth``, ``file:///ckpt/x.pt``, ``/ckpt/dinov2-base/``);
* an fsspec URL (``s3://bucket/ViT-B-16.pt``, ``gs://...``, ``https://...``): copied once into a local cache
  directory keyed by the URL's hash (``~/.cache/segetl/weights``, overridable with ``$SEGETL_CACHE``);
* a model-hub tag (``openai``, ``laion2b_s34b_b88k``, ``hf-hub:org/repo``): only meaningful for open_clip, which
  downloads it itself (needs internet).

`weights_identity` gives the string that stage fingerprints hash: ``sha256:<hex>`` of the bytes for files (cached
in a ``<file>.sha256`` sidecar keyed by size and mtime, so large files are hashed once), ``tag:<name>`` for hub tags
and ``random-init`` for ``None``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CACHE_ENV = "SEGETL_CACHE"
DEFAULT_CACHE = Path("~/.cache/segetl/weights")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
_HASH_CHUNK = 1 << 22  # 4 MiB
_KEYS_SHOWN = 5


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or tensor shapes do not match the architecture it is loaded into."""


def cache_dir() -> Path:
    """Local directory for weights copied from fsspec URLs (``$SEGETL_CACHE`` or ``~/.cache/segetl/weights``)."""
    return Path(os.environ.get(CACHE_ENV, str(DEFAULT_CACHE))).expanduser()


def is_url(ref: str) -> bool:
    """True for fsspec URLs other than ``file://`` (those are plain local paths)."""
    return "://" in ref and not ref.startswith("file://")


def _local_path(ref: str) -> Path:
    return Path(ref.removeprefix("file://")).expanduser()


def is_hub_tag(ref: str) -> bool:
    """True when `ref` names a model-hub tag rather than a file, directory or URL.

    A reference is a tag when it is not a URL, does not exist on disk, has no path separator and no weight-file
    suffix (``openai``, ``laion2b_s34b_b88k``), or starts with ``hf-hub:``. Anything that looks like a path but does
    not exist is *not* a tag, so a typo fails with `FileNotFoundError` instead of a hub download.
    """
    if ref.startswith("hf-hub:"):
        return True
    if is_url(ref) or ref.startswith("file://") or _local_path(ref).exists():
        return False
    return "/" not in ref and os.sep not in ref and not ref.lower().endswith(WEIGHT_SUFFIXES)


def resolve_weights(ref: str | None, key: str = "weights", allow_tags: bool = True) -> str | None:
    """Turn a weight reference into a local path (or pass a hub tag / ``None`` through).

    Args:
        ref: ``None``, a local path, a ``file://`` path, an fsspec URL or a hub tag.
        key: config key the reference came from (e.g. ``"clip.pretrained"``), used in error messages.
        allow_tags: pass hub tags through (open_clip); when False every non-None reference must be a path or URL
            (SAM, DINOv2), so ``"dinov2-base"`` fails with `FileNotFoundError` instead of being taken for a tag.

    Returns:
        ``None`` for ``None``; the tag itself for hub tags; otherwise an existing local file or directory path.
        URLs are downloaded once to ``cache_dir()/<sha256(url)[:16]>/<basename>`` (atomic rename, so a crash never
        leaves a half-written file that looks complete).

    Raises:
        FileNotFoundError: the local path or remote object does not exist; the message names `key`.
    """
    if ref is None or (allow_tags and is_hub_tag(ref)):
        return ref
    if not is_url(ref):
        path = _local_path(ref)
        if not path.exists():
            raise FileNotFoundError(f"{key}: {ref} does not exist")
        return str(path)
    return _download(ref, key)


def _download(url: str, key: str) -> str:
    import fsspec

    target = cache_dir() / hashlib.sha256(url.encode()).hexdigest()[:16] / (url.rstrip("/").rsplit("/", 1)[-1] or "w")
    if target.exists():
        return str(target)
    fs, remote_path = fsspec.core.url_to_fs(url)
    if not fs.exists(remote_path):
        raise FileNotFoundError(f"{key}: {url} does not exist")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    logger.info("copying %s -> %s", url, target)
    if fs.isdir(remote_path):
        fs.get(remote_path, str(partial), recursive=True)
    else:
        fs.get(remote_path, str(partial))
    partial.rename(target)
    return str(target)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, cached in ``<file>.sha256`` keyed by (size, mtime_ns).

    The sidecar is JSON ``{"size": int, "mtime_ns": int, "sha256": str}``; it is ignored (and rewritten) when the
    file's size or mtime changed. A read-only directory just means the hash is recomputed next time.
    """
    path = Path(path)
    stat = path.stat()
    sidecar = path.with_name(path.name + ".sha256")
    try:
        cached = json.loads(sidecar.read_text())
        if cached["size"] == stat.st_size and cached["mtime_ns"] == stat.st_mtime_ns:
            return str(cached["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    hexdigest = digest.hexdigest()
    try:
        sidecar.write_text(json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": hexdigest}))
    except OSError:
        logger.debug("cannot write hash sidecar %s", sidecar)
    return hexdigest


def _dir_sha256(path: Path) -> str:
    """sha256 over (relative name, file sha256) of every file in a directory, sidecars excluded, sorted by name."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.endswith((".sha256", ".partial"))):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def weights_identity(ref: str | None, key: str = "weights", allow_tags: bool = True) -> str:
    """Stable identity of a weight reference, for fingerprints.

    Args:
        ref: as for `resolve_weights`.
        key: config key for error messages.
        allow_tags: as for `resolve_weights`.

    Returns:
        ``random-init`` for ``None``; ``tag:<name>`` for hub tags; ``sha256:<hex>`` of the file bytes (or of the
        sorted per-file hashes for a directory) otherwise. URLs are resolved (downloaded) first, so two URLs with
        the same bytes have the same identity.
    """
    if ref is None:
        return "random-init"
    if allow_tags and is_hub_tag(ref):
        return f"tag:{ref}"
    path = Path(resolve_weights(ref, key, allow_tags=False))  # type: ignore[arg-type]
    return f"sha256:{_dir_sha256(path) if path.is_dir() else file_sha256(path)}"


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.pt/.pth/.bin/.ckpt`` (``torch.load(weights_only=True)``) or ``.safetensors``.

    Training checkpoints are unwrapped: ``{'state_dict': {...}}`` and ``{'model': {...}}`` become the inner dict,
    and a ``module.`` prefix (DataParallel / DDP) is stripped from every key that has it. Tensors land on CPU.

    Raises:
        FileNotFoundError: `path` does not exist.
        TypeError: the file holds no mapping of tensors (e.g. a TorchScript archive).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path), device="cpu")
    else:
        import torch

        state = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise TypeError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _head(keys: list[str]) -> str:
    shown = ", ".join(keys[:_KEYS_SHOWN])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _KEYS_SHOWN else "")


def check_state_dict(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], arch: str, source: str = "checkpoint"
) -> None:
    """Fail before any compute when `state` does not fit `model` exactly (strict keys and shapes).

    Args:
        model: the freshly built architecture.
        state: state dict as returned by `load_state_dict`.
        arch: human-readable architecture name (``"open_clip ViT-B-16"``, ``"sam vit_b"``) for the message.
        source: where `state` came from (path or config key) for the message.

    Raises:
        CheckpointMismatchError: naming the first missing, unexpected and shape-mismatched keys and `arch`.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} (checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or wrong_shape):
        return
    problems = []
    if missing:
        problems.append(f"missing keys: {_head(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_head(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatch: {_head(wrong_shape)}")
    raise CheckpointMismatchError(
        f"{source} does not match the expected architecture {arch}: " + "; ".join(problems)
        + ". Check that the model name/type in the config matches the checkpoint."
    )


def load_checked(model: torch.nn.Module, path: str | Path, arch: str, source: str = "checkpoint") -> None:
    """`load_state_dict` + `check_state_dict` + strict ``model.load_state_dict`` (weights copied in place)."""
    state = load_state_dict(path)
    check_state_dict(model, state, arch, source=f"{source} ({path})")
    model.load_state_dict(state, strict=True)


def random_init_identity(seed: int) -> str:
    """Identity of a randomly initialised model built under `seeded_init(seed)`."""
    return f"random-init:seed={seed}"


def model_weights_identity(ref: str | None, init_seed: int = 0, key: str = "weights", allow_tags: bool = True) -> str:
    """Identity of a model's weights for fingerprints: `weights_identity(ref)`, or the seeded random init."""
    return weights_identity(ref, key=key, allow_tags=allow_tags) if ref else random_init_identity(init_seed)


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Make random weight initialisation deterministic without touching the caller's global RNG state.

    Random-init models carry a ``random-init`` identity in fingerprints, which is only truthful when two builds give
    the same weights; building under a fixed seed guarantees that. Forks the CPU generator only (models are built
    on CPU, then moved).
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
