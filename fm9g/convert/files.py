"""Checkpoint files on both sides of a conversion: Hugging Face folders (``config.json``, single or
sharded safetensors / ``pytorch_model.bin`` with their index json) and fm9g / bmtrain ``.pt`` or
``.safetensors`` files.

Reading memory-maps (safetensors ``safe_open``, ``torch.load(mmap=True, weights_only=True)``);
writing streams: each output tensor is a `TensorPlan` whose ``make()`` is called only when the
tensor is written, so a 7B export never holds several copies of the model in memory. Folders are
written through `fm9g._io.atomic_dir`, files through `fm9g._io.atomic_file` (a full disk or a size
limit is a `fm9g._io.DiskFullError` naming the file, and the output is left as it was).

`load_checkpoint_file` is the one way to ``torch.load`` a file fm9g did not just write (training
uses it too) and `open_safetensors` the one way to open a safetensors file: a refused pickle or a
truncated file fails with an error naming the file and saying what to do. `refuse_replacing_inputs`
keeps every conversion from replacing or writing into its inputs.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import struct
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fm9g._io import atomic_dir, atomic_file, explain_disk_full, find_model_file, name_list, read_json
from fm9g.models.config import DTYPES

__all__ = [
    "ConversionError",
    "DEFAULT_MAX_SHARD_SIZE",
    "load_checkpoint_file",
    "open_safetensors",
    "refuse_replacing_inputs",
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
    return list(load_checkpoint_file(files[0]))


_ZIP_MAGIC = b"PK\x03\x04"  # every torch.save since torch 1.6 writes a zip archive
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def load_checkpoint_file(path: PathLike, *, map_location: str | torch.device = "cpu", mmap: bool = True,
                         error: type[Exception] = ConversionError) -> Any:
    """``torch.load(path, weights_only=True)``, memory-mapped when `mmap` and the file is a zip
    archive (a legacy pre-zip file is read whole), failing with one `error` that names the file and
    says what to do. The one way fm9g opens a ``.pt`` / ``.bin`` it did not just write.

    Args:
        path: the checkpoint file.
        map_location: where tensors go (``"cpu"``: memory-mapped from disk).
        mmap: memory-map a zip archive (tensors are read when touched).
        error: the exception class to raise (e.g. ``ConversionError``, ``CheckpointError``).

    Returns:
        What the file holds (tensors, numbers, strings and their lists / dicts).

    Raises:
        FileNotFoundError: there is no such file.
        error: the file holds other Python objects (refused, never executed), or it is truncated,
            damaged or not a torch file.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        zipped = fh.read(4) == _ZIP_MAGIC
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and zipped)
    except pickle.UnpicklingError as err:
        refused = _REFUSED_GLOBAL.search(str(err))
        if refused is None:
            raise error(f"{path}: not a readable torch checkpoint (truncated or damaged?): "
                        f"torch.load refused it ({_first_line(err)}); copy or download it again") from err
        raise error(
            f"{path}: holds Python objects other than tensors ({refused.group(1).rstrip('.')}), which "
            "torch.load(weights_only=True) refuses to run; fm9g only loads tensors-only checkpoints. If "
            "you trust the file, load it once yourself (torch.load(path, weights_only=False)) and save "
            "its tensors alone: torch.save(state_dict, new_path), or safetensors.torch.save_file"
        ) from err
    except (RuntimeError, EOFError, KeyError, ValueError) as err:
        raise error(f"{path}: not a readable torch checkpoint (truncated or damaged?): torch.load says "
                    f"{_first_line(err) or type(err).__name__}; copy or download it again") from err


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else ""


def open_safetensors(path: PathLike, stack: ExitStack) -> Any:
    """`safetensors.safe_open(path)` kept open by `stack`, failing with a ConversionError that names
    the file (a truncated shard, a damaged header).

    Returns:
        The open handle (``keys()``, ``get_tensor(name)``: memory-mapped tensors).
    """
    from safetensors import SafetensorError, safe_open

    try:
        return stack.enter_context(safe_open(str(path), framework="pt"))
    except SafetensorError as err:
        raise ConversionError(f"{path}: not a readable safetensors file (truncated or damaged?): {err}; "
                              "copy or download it again") from err


def read_hf_state_dict(hf_dir: PathLike, stack: ExitStack) -> dict[str, torch.Tensor]:
    """All weights of an HF directory as memory-mapped tensors (no copy is made).

    Args:
        hf_dir: the directory.
        stack: keeps the safetensors files open; close it when done with the tensors.
    Returns:
        ``{hf_name: tensor}``.
    """
    path = check_hf_dir(hf_dir)
    out: dict[str, torch.Tensor] = {}
    for file in _hf_weight_files(path):
        if file.suffix == ".safetensors":
            handle = open_safetensors(file, stack)
            for name in handle.keys():
                out[name] = handle.get_tensor(name)
        else:
            sd = load_checkpoint_file(file)
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


def refuse_replacing_inputs(outputs: Mapping[str, PathLike], inputs: Mapping[str, PathLike | None]) -> None:
    """Refuse a conversion that would replace or change one of its inputs: an output that is an
    input, that holds one (an output folder around it), or that lies inside an input folder. Paths
    are compared resolved (symlinks, ``..``); ``overwrite`` never allows it.

    Args:
        outputs: each output's name in the message (``"out_dir"``) -> its path.
        inputs: each input's name in the message (``"the checkpoint"``, ``"lora"``) -> its path
            (None: not given, or not a path).

    Raises:
        ConversionError: naming the output and the input, and saying to choose another output.
    """
    for out_name, out in outputs.items():
        o = Path(out).resolve()
        for in_name, given in inputs.items():
            if given is None:
                continue
            i = Path(given).resolve()
            if o == i or o in i.parents:
                raise ConversionError(f"{out_name} {out} would replace {in_name} {given}; "
                                      "choose another output path (outside every input)")
            if i in o.parents:
                raise ConversionError(f"{out_name} {out} is inside {in_name} {given}, and a conversion never "
                                      f"changes its inputs; choose an output path outside {given}")


@contextmanager
def output_dir(dest: Path, *, overwrite: bool) -> Iterator[Path]:
    """`fm9g._io.atomic_dir` for an export folder: refuses a file, and a non-empty folder unless
    `overwrite`."""
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is a file; choose a directory path for the output")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {dest} exists and is not empty; pass overwrite=True "
                              "(CLI: --overwrite) to replace it, or pick another")
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
        handle = open_safetensors(path, stack)
        return {name: handle.get_tensor(name) for name in handle.keys()}
    return unwrap_state_dict(load_checkpoint_file(path), str(path))


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
    """Write one safetensors file, producing and writing one tensor at a time.

    Raises:
        fm9g._io.DiskFullError: the disk is full or a size limit was hit (naming `path`).
    """
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
    with explain_disk_full(path), open(path, "wb") as fh:
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
        index_path = out_dir / f"{prefix}.safetensors.index.json"
        with explain_disk_full(index_path):
            index_path.write_text(json.dumps(index, indent=2) + "\n")
    return names
