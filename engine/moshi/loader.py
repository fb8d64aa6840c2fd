"""Find, verify and load Moshi-architecture weights: a local directory or a Hugging Face cache snapshot.

One path for every checkpoint (the tiny test model, Kyutai's Moshi, NVIDIA PersonaPlex): ``config.json``
names the LM safetensors, the Mimi weights (and optionally a Mimi config) and the sentencepiece tokenizer;
a directory without ``config.json`` is taken as a legacy Moshi 7B repo (moshi's default file names).

Integrity, on every load: each safetensors file's size must match its own header (a truncated or padded
file is refused), and the manifest's sizes when there is one; with a manifest (``aziza-manifest.json``,
written by ``model pull``) every file's sha256 and every tensor's own sha256 are checked, so a corrupted
file is refused naming the tensor whose bytes changed; after loading, every tensor is scanned for NaN/Inf.
Any failure is one ``ModelError`` line naming the file and the tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("NO_TORCH_COMPILE", "1")

if TYPE_CHECKING:
    import sentencepiece
    import torch
    from moshi.models.compression import MimiModel
    from moshi.models.lm import LMModel

MANIFEST_FILE = "aziza-manifest.json"  # {"files": {name: {size, sha256, tensors?}}}: model pull, tiny writer
LEGACY_MANIFEST = "checksums.sha256"  # "<sha256>  <file>" lines (older pulls): hashes only
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                "U8": 1}


class ModelError(RuntimeError):
    """The weights cannot be used: missing file, missing/mismatched tensor, not enough memory."""


@dataclass(frozen=True)
class ModelFiles:
    directory: Path
    config: dict[str, Any]  # the LM kwargs (file-name keys removed); moshi's 7B defaults without config.json
    lm_weights: Path
    mimi_weights: Path
    tokenizer: Path
    mimi_config: dict[str, Any] | None
    repo_id: str | None = None


@dataclass
class VerifyReport:
    files: ModelFiles
    problems: list[str] = field(default_factory=list)
    tensors_checked: int = 0
    files_hashed: int = 0
    parameter_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def resolve_model_dir(model: str | Path, cache_dir: str | Path | None = None) -> tuple[Path, str | None]:
    """A directory path, or a repo id ``owner/name`` already in the Hugging Face cache (never downloads)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path, None
    text = str(model)
    if text.count("/") == 1 and not path.exists():
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            cache = cache_dir or os.environ.get("HF_HUB_CACHE") or None
            snap = snapshot_download(text, local_files_only=True, cache_dir=cache)
        except (LocalEntryNotFoundError, OSError, ValueError) as exc:
            raise ModelError(f"{text!r} is not in the Hugging Face cache; run `aziza-admin model pull {text}`"
                             f" ({exc.__class__.__name__})") from None
        return Path(snap), text
    raise ModelError(f"model {text!r}: no such directory and not a Hugging Face repo id")


def model_files(model: str | Path, cache_dir: str | Path | None = None) -> ModelFiles:
    from moshi.models import loaders

    directory, repo_id = resolve_model_dir(model, cache_dir)
    config_path = directory / "config.json"
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text())
        except ValueError as exc:
            raise ModelError(f"{config_path}: not valid JSON ({exc})") from None
        if not isinstance(config, dict) or "dim" not in config:
            raise ModelError(f"{config_path}: not a Moshi LM config (no 'dim')")
    else:
        config = dict(loaders._lm_kwargs)  # legacy Kyutai repos: Moshi 7B with default file names
    config = dict(config)
    lm_name = config.pop("moshi_name", loaders.MOSHI_NAME)
    mimi_name = config.pop("mimi_name", loaders.MIMI_NAME)
    mimi_config_name = config.pop("mimi_config_name", None)
    tokenizer_name = config.pop("tokenizer_name", loaders.TEXT_TOKENIZER_NAME)
    for key in ("model_type", "lm_gen_config", "tts_config", "stt_config", "model_id", "lora_name"):
        config.pop(key, None)
    mimi_config = None
    if mimi_config_name:
        mimi_config = json.loads(_need(directory, mimi_config_name).read_text())
    return ModelFiles(
        directory=directory, config=config, lm_weights=_need(directory, lm_name),
        mimi_weights=_need(directory, mimi_name), tokenizer=_need(directory, tokenizer_name),
        mimi_config=mimi_config, repo_id=repo_id,
    )


def _need(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.exists():
        raise ModelError(f"{directory}: missing file {name!r}")
    return path


def num_codebooks(config: dict[str, Any]) -> int:
    return int(max(config["dep_q"], config["n_q"] - config["dep_q"]))


def _expected_tensors(files: ModelFiles) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Shapes of every tensor the LM and Mimi expect, from modules built on the meta device (no memory)."""
    import torch
    from moshi.models import loaders

    lm = loaders.get_moshi_lm(None, lm_kwargs=files.config, device="meta", dtype=torch.bfloat16)
    with torch.device("meta"):
        mimi = loaders.get_mimi(None, mimi_config=files.mimi_config, device="meta",
                                num_codebooks=num_codebooks(files.config))
    lm_shapes = {k: tuple(v.shape) for k, v in lm.state_dict().items()}
    mimi_shapes = {k: tuple(v.shape) for k, v in mimi.state_dict().items()}
    return lm_shapes, mimi_shapes


def _check_safetensors(path: Path, expected: dict[str, tuple[int, ...]], report: VerifyReport) -> None:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own SafetensorError for truncated/garbage files
        report.problems.append(f"{path.name}: unreadable safetensors file ({exc})")
        return
    with handle:
        present = set(handle.keys())
        for name in sorted(set(expected) - present):
            report.problems.append(
                f"{path.name}: missing tensor {name} (expected shape {list(expected[name])})")
        for name in sorted(present - set(expected)):
            report.problems.append(f"{path.name}: unexpected tensor {name}")
        for name in sorted(present & set(expected)):
            sl = handle.get_slice(name)
            shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
            report.tensors_checked += 1
            report.parameter_bytes += _numel(shape) * _DTYPE_BYTES.get(dtype, 4)
            if shape != expected[name]:
                report.problems.append(
                    f"{path.name}: tensor {name} has shape {list(shape)}, expected {list(expected[name])}")
            if dtype not in _DTYPE_BYTES:
                report.problems.append(f"{path.name}: tensor {name} has unsupported dtype {dtype}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safetensors_layout(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """(expected file size, tensor name -> absolute byte range) from a safetensors header alone."""
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n > 100 << 20:
            raise ValueError(f"header length {n} is not plausible")
        header = json.loads(fh.read(n))
    ranges: dict[str, tuple[int, int]] = {}
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        ranges[name] = (8 + n + lo, 8 + n + hi)
        end = max(end, hi)
    return 8 + n + end, ranges


def hash_safetensors(path: Path) -> tuple[str, dict[str, str]]:
    """The file's sha256 and each tensor's (over its bytes), in one sequential read."""
    _, ranges = safetensors_layout(path)
    order = sorted(ranges.items(), key=lambda kv: kv[1][0])
    whole = hashlib.sha256()
    per: dict[str, str] = {}
    with path.open("rb") as fh:
        pos = 0
        i = 0
        current = hashlib.sha256()
        while chunk := fh.read(1 << 20):
            whole.update(chunk)
            offset = 0
            while offset < len(chunk) and i < len(order):
                name, (lo, hi) = order[i]
                at = pos + offset
                if at < lo:
                    offset += min(lo - at, len(chunk) - offset)
                    continue
                take = min(hi - at, len(chunk) - offset)
                current.update(chunk[offset: offset + take])
                offset += take
                if pos + offset >= hi:
                    per[name] = current.hexdigest()
                    current = hashlib.sha256()
                    i += 1
            pos += len(chunk)
    return whole.hexdigest(), per


def write_manifest(directory: Path) -> Path:
    """Sizes and sha256 of every file (and of every tensor of the safetensors files) of a model dir."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.name in (MANIFEST_FILE, LEGACY_MANIFEST):
            continue
        entry: dict[str, Any] = {"size": path.stat().st_size}
        if path.suffix == ".safetensors":
            entry["sha256"], entry["tensors"] = hash_safetensors(path)
        else:
            entry["sha256"] = sha256_file(path)
        files[path.name] = entry
    out = directory / MANIFEST_FILE
    out.write_text(json.dumps({"format": "aziza-manifest/1", "files": files}, indent=1) + "\n")
    return out


def read_manifest(directory: Path) -> dict[str, dict[str, Any]] | None:
    """name -> {size?, sha256, tensors?} from the manifest (or the legacy hash list); None without one."""
    path = directory / MANIFEST_FILE
    if path.exists():
        try:
            data = json.loads(path.read_text())
            files = data["files"]
            if not isinstance(files, dict):
                raise TypeError("files is not an object")
            return files
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{path}: unreadable manifest ({exc})") from None
    legacy = directory / LEGACY_MANIFEST
    if legacy.exists():
        out: dict[str, dict[str, Any]] = {}
        for line in legacy.read_text().splitlines():
            digest, _, name = line.partition("  ")
            if name:
                out[name] = {"sha256": digest}
        return out
    return None


def _check_sizes(files: ModelFiles, manifest: dict[str, dict[str, Any]] | None, report: VerifyReport) -> None:
    for path in (files.lm_weights, files.mimi_weights, files.tokenizer):
        size = path.stat().st_size
        want = (manifest or {}).get(path.name, {}).get("size")
        if want is not None and want != size:
            report.problems.append(f"{path.name}: {size:,} bytes, the manifest says {want:,}")
        if path.suffix == ".safetensors":
            try:
                expected, _ = safetensors_layout(path)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                report.problems.append(f"{path.name}: unreadable safetensors header ({exc})")
                continue
            if expected != size:
                report.problems.append(f"{path.name}: {size:,} bytes but its header describes {expected:,} "
                                       f"(truncated or padded)")


def _check_hashes(files: ModelFiles, manifest: dict[str, dict[str, Any]] | None,
                  report: VerifyReport) -> None:
    """Against the manifest if there is one; in a HF cache, LFS blobs are named by their sha256."""
    for path in (files.lm_weights, files.mimi_weights, files.tokenizer):
        entry = (manifest or {}).get(path.name, {})
        want = entry.get("sha256")
        if want is None and path.is_symlink():
            blob = path.resolve().name
            want = blob if len(blob) == 64 else None
        if want is None:
            continue
        report.files_hashed += 1
        tensors = entry.get("tensors")
        if path.suffix == ".safetensors" and isinstance(tensors, dict):
            try:
                got, got_tensors = hash_safetensors(path)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                report.problems.append(f"{path.name}: cannot hash ({exc})")
                continue
            changed = sorted(n for n, h in tensors.items() if got_tensors.get(n) != h)
            if changed:
                more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
                report.problems.append(f"{path.name}: tensor {changed[0]}{more} does not match the manifest "
                                       f"(sha256 {str(got_tensors.get(changed[0]))[:16]}…, expected "
                                       f"{str(tensors[changed[0]])[:16]}…)")
                continue
        else:
            got = sha256_file(path)
        if got != want:
            report.problems.append(f"{path.name}: sha256 {got[:16]}… does not match expected {want[:16]}…")


def verify_model(model: str | Path, check_hashes: bool = True) -> VerifyReport:
    """Check sizes, every tensor's presence and shape (and hashes) without loading weights into memory."""
    files = model_files(model)
    report = VerifyReport(files=files)
    manifest = read_manifest(files.directory)
    _check_sizes(files, manifest, report)
    lm_shapes, mimi_shapes = _expected_tensors(files)
    _check_safetensors(files.lm_weights, lm_shapes, report)
    _check_safetensors(files.mimi_weights, mimi_shapes, report)
    try:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(files.tokenizer))
        if sp.vocab_size() > int(files.config["text_card"]):
            report.problems.append(
                f"tokenizer has {sp.vocab_size()} pieces but the LM text_card is {files.config['text_card']}")
    except (RuntimeError, OSError) as exc:
        report.problems.append(f"{files.tokenizer.name}: not a sentencepiece model ({exc})")
    if check_hashes:
        _check_hashes(files, manifest, report)
    return report


def lm_sha256(files: ModelFiles) -> str | None:
    """The LM weights' sha256 as the manifest (or the HF blob name) records it: the base-model identity
    LoRA adapters are checked against. None when nothing records it."""
    entry = (read_manifest(files.directory) or {}).get(files.lm_weights.name, {})
    digest = entry.get("sha256")
    if digest is None and files.lm_weights.is_symlink():
        blob = files.lm_weights.resolve().name
        digest = blob if len(blob) == 64 else None
    return digest if isinstance(digest, str) else None


def scan_finite(module: Any, file_name: str) -> None:
    """Every floating tensor of ``module`` finite, or ModelError naming the first that is not."""
    import torch

    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and tensor.numel():
            bad = int((~torch.isfinite(tensor.float() if tensor.element_size() == 1 else tensor)).sum())
            if bad:
                raise ModelError(f"{file_name}: tensor {name} holds {bad:,} NaN/Inf values")


def check_memory(needed_bytes: int, available_bytes: int | None, what: str) -> None:
    if available_bytes is not None and needed_bytes > available_bytes:
        raise ModelError(f"out of memory loading {what}: needs {needed_bytes:,} bytes "
                         f"({needed_bytes / 2**30:.2f} GiB), {available_bytes:,} available")


def available_memory(device: torch.device) -> int | None:
    import torch

    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return None


@dataclass
class LoadedModel:
    lm: LMModel
    mimi: MimiModel
    tokenizer: sentencepiece.SentencePieceProcessor | None  # None for random-weight shapes
    files: ModelFiles
    lm_sha256: str | None = None


def load_model(model: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               memory_limit_bytes: int | None = None) -> LoadedModel:
    """Verify (sizes always; hashes when a manifest exists), load LM + Mimi + tokenizer, scan for NaN/Inf.
    ModelError names the bad file and tensor, or the bytes needed."""
    import sentencepiece
    import torch
    from moshi.models import loaders

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    files = model_files(model)
    report = verify_model(model, check_hashes=read_manifest(files.directory) is not None)
    if not report.ok:
        raise ModelError(f"{report.files.directory}: " + "; ".join(report.problems[:5]))
    lm_bytes = sum(_numel(s) for s in _expected_tensors(files)[0].values()) * (
        torch.finfo(dtype).bits // 8)
    needed = lm_bytes + files.mimi_weights.stat().st_size
    limit = memory_limit_bytes if memory_limit_bytes is not None else available_memory(device)
    check_memory(needed, limit, str(files.directory))
    try:
        lm = loaders.get_moshi_lm(files.lm_weights, lm_kwargs=files.config, device=device, dtype=dtype)
        mimi = loaders.get_mimi(files.mimi_weights, files.mimi_config, device=device,
                                num_codebooks=num_codebooks(files.config))
    except torch.OutOfMemoryError:
        raise ModelError(f"out of memory loading {files.directory}: needs {needed:,} bytes "
                         f"({needed / 2**30:.2f} GiB) on {device}") from None
    except MemoryError:
        raise ModelError(f"out of host memory loading {files.directory}: needs {needed:,} bytes") from None
    scan_finite(lm, files.lm_weights.name)
    scan_finite(mimi, files.mimi_weights.name)
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(files.tokenizer))
    return LoadedModel(lm=lm, mimi=mimi, tokenizer=tokenizer, files=files, lm_sha256=lm_sha256(files))
