"""Several processes: the process group, launch variables, config agreement, meshes, memory.

``torchrun`` (or Slurm's ``srun`` running ``torchrun``) starts one process per GPU and sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``. :func:`init_distributed` turns them into a process group (NCCL on CUDA, gloo
on CPU). The original launch scripts set ``GPUS_PER_NODE``, ``NNODES``, ``NODE_RANK`` (or
``RANK``), ``MASTER_ENDPOINT`` (or ``MASTER_ADDR``) and ``MASTER_PORT`` and ran one command per
node; :func:`torchrun_args_from_env` turns those into the ``torchrun`` arguments that
``fm9g train`` re-launches itself with (see docs/distributed.md).

One-process training does not use this module (it imports torch.distributed only inside functions).
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import json
import os
import signal
import socket
import threading
import time
from typing import Any, Iterator, Mapping

import torch

from fm9g._io import ConfigError

__all__ = [
    "DistributedError",
    "world_size_from_env",
    "torchrun_args_from_env",
    "init_distributed",
    "dead_ranks",
    "check_same_config",
    "build_mesh",
    "estimate_memory",
]

DEFAULT_TIMEOUT_S = 600.0  # NCCL / gloo collectives and the rendezvous (env FM9G_DIST_TIMEOUT overrides)


class DistributedError(RuntimeError):
    """The ranks cannot work together: master unreachable, configs differ, a collective timed out."""


def world_size_from_env(environ: Mapping[str, str] | None = None) -> int:
    """``WORLD_SIZE`` set by torchrun (1 when absent)."""
    env = os.environ if environ is None else environ
    try:
        return int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={env.get('WORLD_SIZE')!r} is not an integer") from None


def torchrun_args_from_env(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """``torchrun`` arguments from the original launch variables, or None when one process is meant.

    Reads ``GPUS_PER_NODE`` (processes on this node), ``NNODES``, ``NODE_RANK`` (or ``RANK`` when
    ``NODE_RANK`` is absent: the original scripts used ``RANK`` for the node index),
    ``MASTER_ENDPOINT`` or ``MASTER_ADDR`` (``host`` or ``host:port``) and ``MASTER_PORT``.
    Ignored when ``WORLD_SIZE`` is already set (we are inside torchrun).

    Returns:
        e.g. ``["--nnodes=2", "--nproc_per_node=8", "--node_rank=1", "--master_addr=10.0.0.1",
        "--master_port=12345"]``; None when ``GPUS_PER_NODE`` and ``NNODES`` are absent or both 1.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "LOCAL_RANK" in env:
        return None

    def _int(name: str, default: int) -> int:
        raw = env.get(name)
        if raw in (None, ""):
            return default
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None

    nproc, nnodes = _int("GPUS_PER_NODE", 1), _int("NNODES", 1)
    if nproc <= 1 and nnodes <= 1:
        return None
    node_rank = _int("NODE_RANK", _int("RANK", 0))
    if not 0 <= node_rank < nnodes:
        raise ConfigError(f"NODE_RANK (or RANK)={node_rank} is outside [0, NNODES={nnodes})")
    endpoint = env.get("MASTER_ENDPOINT") or env.get("MASTER_ADDR") or ("127.0.0.1" if nnodes == 1 else "")
    if not endpoint:
        raise ConfigError(f"NNODES={nnodes} needs MASTER_ENDPOINT (or MASTER_ADDR): the host of node 0")
    host, _, port = endpoint.partition(":")
    port = env.get("MASTER_PORT") or port or "29500"
    return [f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", f"--node_rank={node_rank}",
            f"--master_addr={host}", f"--master_port={port}"]


@contextlib.contextmanager
def explain_collective_errors() -> Iterator[None]:
    """Turn a failed or timed-out collective (NCCL / gloo: ``DistBackendError``, ``DistError``, a
    gloo ``Timed out`` RuntimeError) into one :class:`DistributedError` that says what happened on
    which rank and what to do next; other errors pass unchanged."""
    try:
        yield
    except (torch.distributed.DistError, RuntimeError) as err:
        text = str(err)
        collective = isinstance(err, torch.distributed.DistError) or "gloo" in text or "NCCL" in text
        if not collective or isinstance(err, DistributedError):  # (explained already, by an inner block)
            raise
        if os.environ.get("TORCHELASTIC_RUN_ID") and threading.current_thread() is threading.main_thread():
            # torchrun sends SIGTERM to the other ranks the moment it sees one die: let this report reach
            # the log first (torchrun's SIGKILL after its grace period still ends the process)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        rank = os.environ.get("RANK", "?")
        limit = _timeout().total_seconds()
        timed_out = "timed out" in text.lower() or "timeout" in text.lower()
        what = (f"a collective timed out after {limit:.0f}s" if timed_out else "a collective failed")
        dead = dead_ranks()
        if dead:
            raise DistributedError(
                f"rank {rank}: {', '.join(dead)} died (killed or crashed: look for the OOM killer or a "
                f"preemption); {what} ({text.strip().splitlines()[0][:160]}). Resume from the last complete "
                "checkpoint with resume_ckpt=latest") from err
        raise DistributedError(
            f"rank {rank}: {what} ({text.strip().splitlines()[0][:200]}). Another rank is stuck, died or "
            "runs a different config: read the first error in the other ranks' logs; for a slow step "
            "(a large checkpoint save, a first compile) raise FM9G_DIST_TIMEOUT (seconds, now "
            f"{limit:.0f}); for NCCL set NCCL_DEBUG=INFO to see which link failed") from err


_RANK_KEY = "fm9g/rank-process/"  # + rank -> "<host> <pid>", in the process group's store


def _register_process() -> None:
    """Write this rank's host and pid into the process group's store, for :func:`dead_ranks`."""
    import torch.distributed as dist

    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"{_RANK_KEY}{dist.get_rank()}", f"{socket.gethostname()} {os.getpid()}")
    except (RuntimeError, ValueError, AttributeError):  # no store (another init method): nothing to name later
        pass


def _process_gone(pid: int) -> bool:
    """True when ``pid`` does not run on this host (absent, or a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
        return False


def dead_ranks() -> list[str]:
    """``["rank 1 (pid 4242 on host-a)", ...]``: the ranks of this process group on this host whose
    process is gone (what can be told from here; ranks on other hosts are not judged). Empty when
    no group is initialised or its store cannot be read."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return []
    try:
        store = dist.distributed_c10d._get_default_store()
        keys = [f"{_RANK_KEY}{r}" for r in range(dist.get_world_size()) if r != dist.get_rank()]
        found = [(k, store.get(k).decode()) for k in keys if store.check([k])]
    except (RuntimeError, ValueError, AttributeError):  # the store went away with the launcher
        return []
    here = socket.gethostname()
    return [f"rank {k[len(_RANK_KEY):]} (pid {pid} on {host})" for k, (host, pid) in
            ((k, v.split()) for k, v in found) if host == here and _process_gone(int(pid))]


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("FM9G_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))


def _check_master_reachable(addr: str, port: int, timeout_s: float) -> None:
    """Fail fast, naming ``addr:port``, when the rendezvous store cannot be reached."""
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    last: Exception | None = None
    while datetime.datetime.now() < deadline:
        try:
            with socket.create_connection((addr, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as err:
            last = err
            time.sleep(0.5)
    raise DistributedError(
        f"rank {os.environ.get('RANK', '?')} cannot reach the master at MASTER_ADDR:MASTER_PORT = {addr}:{port} "
        f"within {timeout_s:.0f}s ({last}); check that node 0 is running, that the address and port are the ones "
        "node 0 listens on, and that no firewall blocks the port"
    )


def init_distributed(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Initialise the default process group from torchrun's environment (idempotent); without
    torchrun (no ``WORLD_SIZE``), a group of this one process.

    Args:
        backend: ``"nccl"`` | ``"gloo"``; default NCCL when CUDA is available, else gloo.
    Returns:
        ``(rank, world_size, device)``; on CUDA the device is ``cuda:LOCAL_RANK`` (also made current).
    Raises:
        DistributedError: the master cannot be reached (names ``MASTER_ADDR:MASTER_PORT``).
    """
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        backend = backend or ("nccl" if cuda else "gloo")
        rank = int(os.environ.get("RANK", "0"))
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        timeout = _timeout()
        if addr and port and rank != 0 and not os.environ.get("TORCHELASTIC_RUN_ID"):
            _check_master_reachable(addr, int(port), timeout.total_seconds())
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
        if "WORLD_SIZE" not in os.environ:  # one process without torchrun (data_parallel="fsdp" on one device)
            kwargs.update(init_method=f"tcp://127.0.0.1:{free_local_port()}", rank=0, world_size=1)
        if cuda:
            torch.cuda.set_device(device)
            kwargs["device_id"] = device
        try:
            dist.init_process_group(**kwargs)
        except (RuntimeError, ValueError) as err:  # DistStoreError / timeouts are RuntimeErrors
            raise DistributedError(
                f"rank {rank}: cannot join the process group at MASTER_ADDR:MASTER_PORT = {addr}:{port} ({err}); "
                "check that every node runs the same command with the same --master_addr / --master_port, and "
                f"that WORLD_SIZE={os.environ.get('WORLD_SIZE')} processes are started in all"
            ) from err
        atexit.register(_destroy_at_exit)
        _register_process()
    return dist.get_rank(), dist.get_world_size(), device


def free_local_port() -> int:
    """A TCP port free on this machine now (for a one-process group's store)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _destroy_at_exit() -> None:
    """Destroy the process group this module created before the interpreter shuts down: a process
    that exits with a live gloo group can abort in its destructor ("terminate called without an
    active exception", exit -6), which torchrun reports as a failed run after a finished one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def config_hash(config_dict: dict[str, Any]) -> str:
    """SHA-256 of a JSON-able config (sorted keys): equal on every rank of a consistent run."""
    return hashlib.sha256(json.dumps(config_dict, sort_keys=True, default=str).encode()).hexdigest()


def check_same_config(config_dict: dict[str, Any], *, what: str = "train config") -> None:
    """Raise on every rank when the ranks were started with different configs.

    Every rank hashes ``config_dict`` (e.g. ``TrainConfig.to_dict()``) and all hashes are gathered.

    Raises:
        DistributedError: naming the ranks whose config differs from rank 0's and the keys that differ.
    """
    import torch.distributed as dist

    digest = config_hash(config_dict)
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    if not bad:
        return
    items = [None] * dist.get_world_size()
    dist.all_gather_object(items, json.loads(json.dumps(config_dict, default=str)))
    keys = sorted(k for k in set(items[0]) | set(items[bad[0]]) if items[0].get(k) != items[bad[0]].get(k))
    raise DistributedError(
        f"the {what} differs between ranks: ranks {bad} differ from rank 0 (first differing keys: {keys[:8]}); "
        "start every rank with the same config file and --set overrides"
    )


def build_mesh(sharding: str, world_size: int, *, device_type: str, local_world_size: int | None = None) -> Any:
    """The device mesh for ``data_parallel_shard``.

    ``"full"``: a 1-D mesh over all ranks (weights, gradients and optimizer state sharded over
    all). ``"hybrid"``: a 2-D mesh ``("replicate", "shard")`` = ``(nodes, ranks per node)``:
    sharded within a node, replicated across nodes (gradients all-reduced between nodes).

    Args:
        local_world_size: ranks per node (default ``LOCAL_WORLD_SIZE`` from torchrun).
    """
    from torch.distributed.device_mesh import init_device_mesh

    if sharding == "full":
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    if sharding == "hybrid":
        per_node = int(local_world_size or os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if world_size % per_node:
            raise ConfigError(f"data_parallel_shard='hybrid': WORLD_SIZE={world_size} is not a multiple of "
                              f"the ranks per node ({per_node})")
        return init_device_mesh(device_type, (world_size // per_node, per_node), mesh_dim_names=("replicate", "shard"))
    raise ConfigError(f"data_parallel_shard={sharding!r}: expected 'full' or 'hybrid'")


# bytes per trained parameter of each optimizer on the GPU: (weights, gradients, optimizer state)
OPTIMIZER_BYTES = {"adamw": (4, 4, 8), "adamw_master": (2, 2, 12), "adamw_bf16": (2, 2, 4)}
OFFLOAD_BYTES = (2, 2, 0)  # offload: bf16 weights and gradients stay on the GPU ...
OFFLOAD_HOST_BYTES = 12  # ... the fp32 masters and two moments are host memory


def _shapes(config: Any) -> tuple[int, int, int]:
    """``(parameters, parameters of one decoder layer, parameters of the root unit)`` of a model
    config (the root: input embedding and, when untied, lm_head)."""
    d, L, V, ff = config.dim_model, config.num_layers, config.vocab_size, config.dim_ff
    kv = config.num_kv_heads * config.dim_head
    per_layer = d * config.num_heads * config.dim_head * 2 + d * kv * 2 + (3 if config.ffn_gated else 2) * d * ff + 2 * d
    if config.qkv_bias:
        per_layer += config.num_heads * config.dim_head + 2 * kv
    embed = V * d * (1 if config.tie_lm_head else 2)
    return L * per_layer + embed + d, per_layer, embed


def _activation_bytes(config: Any, tokens: int, act_bytes: int, use_checkpoint: bool | float) -> float:
    """Activations of ``tokens`` tokens: a recomputed layer keeps its [T, d] input, the others all
    their activations (flash attention: no T^2 term), plus one layer's full activations while it is
    recomputed and the logits chunk (``use_checkpoint``: all layers, none, or a share of them)."""
    from fm9g.models.fm9g import checkpointed_layers

    d, L = config.dim_model, config.num_layers
    one_layer = tokens * (34 * d + 2 * config.dim_ff) * act_bytes / 2
    logits = min(tokens, 8192) * config.vocab_size * 4.0
    recomputed = sum(checkpointed_layers(L, use_checkpoint))
    return recomputed * tokens * d * act_bytes + (L - recomputed + (recomputed > 0)) * one_layer + logits


def estimate_memory(
    config: Any,
    world_size: int,
    *,
    sharding: str = "full",
    offload: bool = False,
    optimizer: str = "adamw",
    gpus_per_node: int = 8,
    batch_size: int = 1,
    max_length: int = 4096,
    use_checkpoint: bool | float = True,
    precision: str = "bf16",
) -> dict[str, float]:
    """Per-GPU memory (bytes) of full training with the torch engine's FSDP2, estimated from the shapes.

    Model state per trained parameter (:data:`OPTIMIZER_BYTES`): ``adamw`` fp32 weights, fp32
    gradients and two fp32 moments (16 B); ``adamw_master`` bf16 weights and gradients, fp32 masters
    and moments (16 B); ``adamw_bf16`` bf16 everything (8 B); divided by the shard group
    (``world_size`` for ``"full"``, ``min(world_size, gpus_per_node)`` for ``"hybrid"``). With
    ``offload`` the GPU keeps bf16 weights and gradients (4 B) and the fp32 masters and moments
    (12 B) are host memory (``"host"``, per rank). Transient: one gathered layer in bf16
    (x2 for prefetch) and the activations of ``batch_size`` x ``max_length`` tokens
    (:func:`_activation_bytes`). A planning figure, not a promise: allocator fragmentation, the
    CUDA context and NCCL buffers add a few GB.

    Args:
        config: an ``FM9GConfig`` (or a preset name such as ``"fm9g-7b"``).
        world_size: number of GPUs.
    Returns:
        ``{"weights", "grads", "optimizer", "gathered", "activations", "total", "host"}`` in bytes
        (GPU figures per GPU, ``host`` per rank) and ``"params"`` (the parameter count).
    """
    if isinstance(config, str):
        from fm9g.models.config import FM9GConfig

        config = FM9GConfig.from_name(config)
    if sharding not in ("full", "hybrid"):
        raise ConfigError(f"sharding={sharding!r}: expected 'full' or 'hybrid'")
    if optimizer not in OPTIMIZER_BYTES:
        raise ConfigError(f"optimizer={optimizer!r}: expected one of {', '.join(OPTIMIZER_BYTES)}")
    params, per_layer, root = _shapes(config)
    group = max(1, world_size if sharding == "full" else min(world_size, gpus_per_node))
    weights, grads, opt = (b * params / group for b in (OFFLOAD_BYTES if offload else OPTIMIZER_BYTES[optimizer]))
    host = OFFLOAD_HOST_BYTES * params / group if offload else 0.0
    act_bytes = 2 if precision == "bf16" else 4
    gathered = 2.0 * act_bytes * max(per_layer, root) if (group > 1 or offload) else 0.0
    activations = _activation_bytes(config, batch_size * max_length, act_bytes, use_checkpoint)
    total = weights + grads + opt + gathered + activations
    return {"params": float(params), "weights": weights, "grads": grads, "optimizer": opt,
            "gathered": gathered, "activations": activations, "total": total, "host": host}
