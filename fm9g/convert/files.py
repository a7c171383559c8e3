"""Checkpoint files on both sides of a conversion: Hugging Face folders (``config.json``, single or
sharded safetensors / ``pytorch_model.bin`` with their index json) and fm9g / bmtrain ``.pt`` or
``.safetensors`` files.

Reading memory-maps (safetensors ``safe_open``, ``torch.load(mmap=True, weights_only=True)``);
writing streams: each output tensor is a `TensorPlan` whose ``make()`` is called only when the
tensor is written, so a 7B export never holds several copies of the model in memory. Folders are
written through `fm9g._io.atomic_dir`, files through `fm9g._io.atomic_file`.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fm9g._io import atomic_dir, atomic_file, find_model_file, name_list, read_json
from fm9g.models.config import DTYPES

__all__ = [
    "ConversionError",
    "DEFAULT_MAX_SHARD_SIZE",
    "TensorPlan",
    "check_hf_dir",
    "hf_weight_names",
    "read_hf_state_dict",
    "resolve_ckpt",
    "read_bmt_checkpoint",
    "unwrap_state_dict",
    "write_safetensors",
    "save_safetensors_sharded",
    "write_state_dict",
    "output_dir",
    "copy_reference_files",
    "read_conversion_json",
]

PathLike = str | os.PathLike[str]

DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3

#: safetensors dtype code of every torch dtype of the one dtype table
_ST_CODES: dict[torch.dtype, str] = dict(DTYPES.values())

# reference_dir files copied into an export (never its weights, config or modeling code)
_REFERENCE_FILE_PATTERNS = (
    r"generation_config\.json",
    r"tokenizer.*",
    r"tokenization_.*\.py",
    r"special_tokens_map\.json",
    r"added_tokens\.json",
    r"vocab.*",
    r"merges\.txt",
    r"chat_template.*",
    r".*\.tiktoken",
    r"spiece\.model",
    r"preprocessor_config\.json",
)
_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class ConversionError(ValueError):
    """A checkpoint or directory that cannot be converted; the message says what to change."""


def read_conversion_json(path: Path) -> dict[str, Any]:
    """`fm9g._io.read_json`, failing with a ConversionError."""
    return read_json(path, error=ConversionError)


# ================================================================================================
# Hugging Face folders
# ================================================================================================


def check_hf_dir(hf_dir: PathLike) -> Path:
    """`hf_dir` as a Path, after checking it is a folder with a ``config.json``."""
    path = Path(hf_dir)
    if not path.exists():
        raise FileNotFoundError(f"Hugging Face directory {str(path)!r} does not exist; pass the folder holding config.json")
    if not path.is_dir():
        raise ConversionError(
            f"{path} is a file, not a Hugging Face directory; pass the folder holding config.json and the weights"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face model directory?")
    return path


def _hf_weight_files(path: Path) -> list[Path]:
    """The weight files of an HF directory, in index order (safetensors preferred)."""
    for index_name in _INDEX_NAMES:
        index = path / index_name
        if index.is_file():
            weight_map = read_conversion_json(index).get("weight_map")
            if not isinstance(weight_map, Mapping):
                raise ConversionError(f"{index}: no weight_map")
            files = list(dict.fromkeys(weight_map.values()))
            absent = [f for f in files if not (path / f).is_file()]
            if absent:
                raise FileNotFoundError(f"{index} lists shard(s) that are not in {path}: {name_list(absent)}")
            return [path / f for f in files]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    raise FileNotFoundError(
        f"{path} holds no weights: expected model.safetensors, model.safetensors.index.json + shards, "
        "pytorch_model.bin or pytorch_model.bin.index.json"
    )


def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ConversionError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConversionError(f"{path}: not a safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    return header


def hf_weight_names(path: Path) -> list[str]:
    """Names of all weights of an HF directory, read cheaply (headers / index only)."""
    for index_name in _INDEX_NAMES:
        if (path / index_name).is_file():
            _hf_weight_files(path)  # checks the shards exist
            return list(read_conversion_json(path / index_name)["weight_map"])
    files = _hf_weight_files(path)
    if files[0].suffix == ".safetensors":
        return list(_safetensors_header(files[0]))
    return list(_load_torch_file(files[0]))


def _load_torch_file(path: Path) -> Any:
    """`torch.load` memory-mapped when the file is a zip archive (every file since torch 1.6)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err) and "zip" not in str(err):
            raise ConversionError(f"{path}: cannot be read by torch.load ({err})") from None
        obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except Exception as err:  # pickle errors, weights_only refusals
        raise ConversionError(f"{path}: cannot be read with torch.load(weights_only=True): {err}") from None
    return obj


def read_hf_state_dict(hf_dir: PathLike, stack: ExitStack) -> dict[str, torch.Tensor]:
    """All weights of an HF directory as memory-mapped tensors (no copy is made).

    Args:
        hf_dir: the directory.
        stack: keeps the safetensors files open; close it when done with the tensors.
    Returns:
        ``{hf_name: tensor}``.
    """
    from safetensors import safe_open

    path = check_hf_dir(hf_dir)
    out: dict[str, torch.Tensor] = {}
    for file in _hf_weight_files(path):
        if file.suffix == ".safetensors":
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
            for name in handle.keys():
                out[name] = handle.get_tensor(name)
        else:
            sd = _load_torch_file(file)
            if not isinstance(sd, Mapping):
                raise ConversionError(f"{file}: expected a dict of tensors, got {type(sd).__name__}")
            out.update(sd)
    return out


def copy_reference_files(reference_dir: Path, out: Path) -> list[str]:
    """Copy the tokenizer, generation and chat-template files of `reference_dir` into `out`."""
    copied = []
    patterns = [re.compile(p) for p in _REFERENCE_FILE_PATTERNS]
    for f in sorted(reference_dir.iterdir()):
        if f.is_file() and any(p.fullmatch(f.name) for p in patterns):
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
    return copied


@contextmanager
def output_dir(dest: Path, *, overwrite: bool) -> Iterator[Path]:
    """`fm9g._io.atomic_dir` for an export folder: refuses a file, and a non-empty folder unless
    `overwrite`."""
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is a file; choose a directory path for the output")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {dest} exists and is not empty; pass overwrite=True or pick another")
    with atomic_dir(dest) as tmp:
        yield tmp


# ================================================================================================
# fm9g / bmtrain checkpoint files
# ================================================================================================


def unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint (a bare dict, or under model / state_dict / module)."""
    if isinstance(obj, Mapping) and obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("model", "state_dict", "module"):
            if isinstance(obj.get(key), Mapping):
                return unwrap_state_dict(obj[key], source)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{source}: entries that are not tensors: {name_list(bad)}")
    return dict(obj)


def resolve_ckpt(ckpt: PathLike) -> Path:
    """The checkpoint file: `ckpt` itself, or the one model file of a training step folder
    (``fm9g_live_checkpoint*.pt`` first, as the original resume does, else its one ``.pt`` /
    ``.safetensors``)."""
    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_dir():
        return path
    try:
        live = find_model_file(path)
    except FileExistsError as err:
        raise ConversionError(str(err)) from None
    if live is not None:
        return live
    pts = sorted(p for p in path.glob("*.pt") if p.name != "trainer_state.pt")
    found = pts or sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        raise ConversionError(
            f"{path} is a directory with {len(found)} checkpoint files ({name_list([p.name for p in found])}); "
            "pass the .pt file itself"
        )
    return found[0]


def read_bmt_checkpoint(ckpt: PathLike, stack: ExitStack) -> dict[str, torch.Tensor]:
    """A bmtrain-named checkpoint (``.pt`` or ``.safetensors``) as memory-mapped tensors.

    Args:
        ckpt: the file, or a step directory holding exactly one ``.pt``.
        stack: keeps a safetensors file open while the tensors are used.
    """
    path = resolve_ckpt(ckpt)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        handle = stack.enter_context(safe_open(str(path), framework="pt"))
        return {name: handle.get_tensor(name) for name in handle.keys()}
    return unwrap_state_dict(_load_torch_file(path), str(path))


def write_state_dict(path: Path, sd: Mapping[str, torch.Tensor], *, safetensors: bool) -> None:
    """Write `sd` to `path` atomically: a ``torch.save`` dict, or one safetensors file."""
    with atomic_file(path) as tmp:
        if safetensors:
            write_safetensors(tmp, [TensorPlan.of(k, v) for k, v in sd.items()])
        else:
            torch.save(dict(sd), tmp)


# ================================================================================================
# writing safetensors, streaming
# ================================================================================================


@dataclass(kw_only=True)
class TensorPlan:
    """One output tensor: its name, final shape / dtype, and how to make it (called once, late)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> "TensorPlan":
        """A plan that writes `tensor` as it is."""
        return cls(name=name, shape=tuple(tensor.shape), dtype=tensor.dtype, make=lambda: tensor)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors(path: Path, plans: list[TensorPlan], metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file, producing and writing one tensor at a time."""
    header: dict[str, Any] = {}
    offset = 0
    for p in plans:
        if p.dtype not in _ST_CODES:
            raise ConversionError(f"{p.name}: dtype {p.dtype} cannot be stored in safetensors")
        header[p.name] = {"dtype": _ST_CODES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for p in plans:
            t = p.make()
            if tuple(t.shape) != p.shape or t.dtype != p.dtype:
                raise AssertionError(f"{p.name}: produced {tuple(t.shape)} {t.dtype}, planned {p.shape} {p.dtype}")
            t = t.detach().cpu().contiguous().reshape(-1)
            if t.numel():
                fh.write(memoryview(t.view(torch.uint8).numpy()))
            del t


def save_safetensors_sharded(
    out_dir: Path,
    plans: list[TensorPlan],
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    prefix: str = "model",
) -> list[str]:
    """Write ``plans`` as ``<prefix>.safetensors`` or ``<prefix>-0000i-of-0000n.safetensors`` shards
    plus ``<prefix>.safetensors.index.json`` (the Hugging Face layout). Returns the file names."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for p in plans:
        if shards[-1] and size + p.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    n = len(shards)
    names = [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards):
        write_safetensors(out_dir / name, shard)
        weight_map.update({p.name: name for p in shard})
    if n > 1:
        index = {"metadata": {"total_size": sum(p.nbytes for p in plans)}, "weight_map": weight_map}
        (out_dir / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names
