"""The pieces the training loop is assembled from: devices, threads, seeds, model, optimizer, schedule.

Each is a small function so that the loop in :mod:`bloodcell.train.loop` reads top to bottom, and so that
other stages (the learning-rate finder, tuning) can build exactly the same model and optimizer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from types import FrameType

import numpy as np
import psutil
import torch
from lightning_fabric import Fabric
from lightning_fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning_fabric.strategies import DDPStrategy

from bloodcell.config import OptimizerConfig, RunConfig, ScheduleConfig, TrainConfig
from bloodcell.errors import UserError
from bloodcell.machine import available_cores
from bloodcell.models import Classifier, create_model, get_spec
from bloodcell.notices import warn_once

log = logging.getLogger(__name__)

# How long set_threads watches the cores to count the idle ones (a short, one-off cost per run).
IDLE_SAMPLE_SECONDS = 0.3

#: How long the processes of a distributed run wait for each other to start (the process group's rendezvous).
#: Torch's default, 30 minutes, left a process whose peers never come (a launcher's variables without the
#: launcher) hanging silently for that long; the processes of one run start together, so a few minutes is ample
#: even when one of them decodes the dataset first. Later collectives keep Lightning's 30 minutes.
RENDEZVOUS_TIMEOUT = timedelta(minutes=5)

#: The environment variables each launcher starts its processes with, named when they do not meet.
LAUNCHER_VARIABLES = {
    "torchrun": ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"),
    "SLURM": ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "SLURM_PROCID", "SLURM_STEP_ID"),
}


# ------------------------------------------------------------------ devices, processes, threads
def launch_topology(train: TrainConfig) -> tuple[int | str, int]:
    """``(devices per node, nodes)`` for Fabric: from torchrun or SLURM when launched by them, else the config.

    Under ``torchrun`` or ``srun`` the launcher has already started one process per device, so the numbers
    must come from its environment; ``--devices`` then only matters for a plain single-process start. A SLURM
    job of several tasks whose script runs bloodcell without ``srun`` is refused: that one process would wait
    for the others, which nothing starts.
    """
    env = os.environ
    launcher = launched_by(env)
    if launcher == "torchrun":
        local = int(env["LOCAL_WORLD_SIZE"])
        return local, max(1, int(env.get("WORLD_SIZE", local)) // local)
    if launcher == "SLURM":
        if started_without_srun(env):
            raise UserError(
                f"SLURM_NTASKS={env['SLURM_NTASKS']}, but srun did not start this process (no SLURM_STEP_ID): alone, "
                f"it would wait for the other {int(env['SLURM_NTASKS']) - 1} forever; start it with srun in the job "
                "script (srun bloodcell ...: one process a task), or ask SLURM for one task"
            )
        nodes = int(env.get("SLURM_NNODES", "1"))
        per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        tasks = int(per_node) if per_node.isdigit() else int(env["SLURM_NTASKS"]) // nodes
        if isinstance(train.devices, int) and train.devices > tasks:  # a one-task job script, say
            warn_once(log, "--devices %d is not used: SLURM started %d task(s) a node, and each trains on one device; "
                      "launch with srun --ntasks-per-node %d for %d devices", train.devices, tasks, train.devices,
                      train.devices)  # fmt: skip
        return tasks, nodes
    return train.devices, 1


def launched_by(env: Mapping[str, str]) -> str | None:
    """``torchrun`` or ``SLURM`` when their variables say they started this process, else None.

    SLURM as Lightning's ``SLURMEnvironment.detect`` sees it (``SLURM_NTASKS`` set, and the job not an
    interactive ``bash``/``interactive`` shell of ``salloc``), so that Fabric and this agree on the processes.
    """
    if "TORCHELASTIC_RUN_ID" in env and "LOCAL_WORLD_SIZE" in env:
        return "torchrun"
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in {"bash", "interactive"}:
        return "SLURM"
    return None


def started_without_srun(env: Mapping[str, str]) -> bool:
    """Whether this is the one process of a SLURM job script (or ``salloc`` shell) that asked for several tasks.

    A job script runs once, not once a task: only ``srun`` starts the tasks, and it sets ``SLURM_STEP_ID`` for
    them (``SLURM_STEPID`` in old releases), which the script's own process lacks. Lightning 2.6 tells the two
    apart only by whether an ``srun`` command exists, and then merely warns (its pull request 21712 proposes
    this very check).
    """
    tasks = env.get("SLURM_NTASKS", "1")
    return tasks.isdigit() and int(tasks) > 1 and not ({"SLURM_STEP_ID", "SLURM_STEPID"} & env.keys())


def launcher_variables(env: Mapping[str, str]) -> str:
    """``NAME=value, ...`` of the variables the process count came from (torchrun's, SLURM's or Fabric's own)."""
    launcher = launched_by(env)
    names = LAUNCHER_VARIABLES[launcher] if launcher else ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return ", ".join(f"{name}={env[name]}" for name in names if name in env)


def resolve_precision(train: TrainConfig) -> str:
    """``auto``: bf16 mixed precision on a GPU that supports it (fp16 on older ones), and on a CPU whose
    instructions compute in bf16 (AVX512-BF16 or AMX: recent Xeons, AMD Zen 4 and later); fp32 elsewhere.

    On the 2-core AMD EPYC (Zen 4) development machine bf16 made bloodnet's training step 1.38x faster at
    160 px; a CPU without those instructions would emulate bf16 and run slower than in fp32.
    """
    if train.precision != "auto":
        return train.precision
    accelerator = resolve_accelerator(train)
    if accelerator in {"cuda", "gpu"} and torch.cuda.is_available():
        # Without including_emulation=False torch says yes on any GPU that can hold a bf16 tensor (a V100 or a
        # T4 too), where bf16 arithmetic is emulated: such GPUs get fp16 with its loss scaler instead.
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"
    return "bf16-mixed" if accelerator == "cpu" and cpu_computes_bf16() else "32-true"


def resolve_accelerator(train: TrainConfig) -> str:
    """``auto``: a CUDA GPU when there is one, else the CPU; any other choice as given.

    Apple's MPS only when asked for (``train.accelerator=mps``): Lightning's own ``auto`` would take it first,
    but it runs one process only (``--devices 2`` would fail there, where it means two CPU processes) and
    this project has not measured it.
    """
    if train.accelerator != "auto":
        return train.accelerator
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic instructions (x86 AVX512-BF16 or AMX) that PyTorch uses."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own checks (private API)
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def make_fabric(train: TrainConfig) -> Fabric:
    """A Lightning Fabric for the configured accelerator, devices and precision (DDP when more than one)."""
    devices, nodes = launch_topology(train)
    accelerator = resolve_accelerator(train)
    many = nodes > 1 or (devices not in (1, "auto") and int(devices) > 1) or (
        devices == "auto" and accelerator in {"cuda", "gpu"} and torch.cuda.device_count() > 1
    )
    try:
        return Fabric(
            accelerator=accelerator,
            devices=devices,
            num_nodes=nodes,
            precision=resolve_precision(train),  # type: ignore[arg-type]
            strategy=BoundedRendezvousDDP(timeout=RENDEZVOUS_TIMEOUT) if many else "auto",
        )
    except (RuntimeError, ValueError) as error:  # e.g. cuda asked for on a machine without a GPU
        raise UserError(f"train.accelerator={train.accelerator}, train.devices={train.devices}: {error}") from None


class BoundedRendezvousDDP(DDPStrategy):
    """Lightning's DDP (``strategy="ddp"``), whose processes wait for each other to start no longer than the
    timeout it is given, and can be stopped by Ctrl-C or SIGTERM while they wait.

    On the first process of ``--devices N`` it also passes SIGTERM on to the N - 1 processes that Fabric's
    launcher started: they would otherwise learn of its end at their next collective, and fail there with a
    traceback ("Connection closed by peer"). Ctrl-C on a terminal reaches all of them already.
    """

    def setup_environment(self) -> None:
        children: Sequence[subprocess.Popen] = getattr(self.launcher, "procs", [])
        if children:
            forward_sigterm(children)
        group_existed = torch.distributed.is_initialized()  # the second stage of a refit reuses the first's
        try:
            with signals_end_a_blocking_wait(children):
                super().setup_environment()
        except torch.distributed.DistError as error:  # DistStoreError, DistNetworkError: the peers did not come
            words = " ".join(str(error).split())[:200]
            waited = (self._timeout or default_pg_timeout).total_seconds()
            raise UserError(
                f"the {self.world_size} training processes did not all start within {waited:.0f} s ({words}); "
                f"their count came from {launcher_variables(os.environ)}: start every one (srun, torchrun), or "
                "run one process without these variables"
            ) from None
        if not group_existed:  # the collectives that follow keep Lightning's timeout
            if hasattr(torch.distributed, "set_timeout"):
                torch.distributed.set_timeout(default_pg_timeout)
            else:  # older torch has only the private name (deprecated in favour of the public one)
                from torch.distributed.distributed_c10d import _set_pg_timeout

                _set_pg_timeout(default_pg_timeout)


def forward_sigterm(children: Sequence[subprocess.Popen]) -> None:
    """Send each child the SIGTERM this process gets, then handle it as before (the CLI: stop and say so)."""
    previous = signal.getsignal(signal.SIGTERM) or signal.SIG_DFL  # None: a handler set outside Python

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            child.send_signal(signum)  # a no-op for one that has ended
        if callable(previous):
            previous(signum, frame)
        else:  # SIG_DFL: end as without this handler (SIG_IGN: carry on)
            signal.signal(signum, previous)
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, forward)


@contextlib.contextmanager
def signals_end_a_blocking_wait(children: Sequence[subprocess.Popen] = ()) -> Iterator[None]:
    """Let Ctrl-C and SIGTERM end this process while it waits inside a blocking C++ call (the rendezvous).

    Why: Python runs a signal's handler only when control comes back to the interpreter, so a process waiting
    for peers that never came ignored both, and only SIGKILL ended it. Python's own C-level handler still
    writes the signal's number to the "wakeup fd" the moment it arrives: a thread reading that ends the process
    at once, with main()'s status (130, 143) and its one line (from the first process only), after passing
    SIGTERM on to ``children``. Nothing is lost by ending so abruptly here: no file is being written. A signal
    whose handler is the default (or ignored) acts as it would without this.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set the fd
        yield
        return
    read, write = os.pipe()
    os.set_blocking(write, False)  # as Python requires of a wakeup fd
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    watcher = threading.Thread(target=_end_on_signal, args=(read, children), name="signals-end-the-wait", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        os.write(write, b"\0")  # no signal has number 0: the watcher's cue to return
        watcher.join()
        signal.set_wakeup_fd(previous)
        os.close(read)
        os.close(write)


def _end_on_signal(read: int, children: Sequence[subprocess.Popen]) -> None:
    from bloodcell.train.run import is_first_process

    while (signum := os.read(read, 1)[0]) != 0:
        if signum not in (signal.SIGINT, signal.SIGTERM):
            continue  # another signal a handler was set for: that handler runs once the wait is over
        for child in children:
            child.send_signal(signal.SIGTERM)
        if is_first_process():
            how = "terminated" if signum == signal.SIGTERM else "interrupted"
            sys.stderr.write(f"{how} while the training processes waited for each other to start "
                             f"({launcher_variables(os.environ)})\n")  # fmt: skip
            sys.stderr.flush()
        os._exit(128 + signum)


def set_threads(requested: int, local_processes: int) -> int:
    """Set torch's intra-op threads and return the number; ``requested`` 0 chooses automatically.

    Automatic: the cores this process may use, shared among the node's training processes, and on a busy
    machine only as many as are idle. OpenMP threads wait for each other at every operation, so one
    thread that the OS deschedules stalls all of them: on a 2-core machine shared with other jobs, 1
    thread trained about 2.7x faster than 2 (measured), while on an idle machine 2 threads are best.
    Images come from an in-memory tensor, so no DataLoader workers compete for the cores.

    Idle cores are sampled now, over a fraction of a second, not read from the load average: the
    1-minute load average still counts a run that just finished in this same process (the holdout stage
    before a refit, the previous recipe of a benchmark), which halved the threads of the run after it.
    """
    cores = available_cores()
    if requested:
        threads = min(requested, cores)
    else:
        threads = max(1, cores // max(1, local_processes))
        busy = psutil.cpu_percent(interval=IDLE_SAMPLE_SECONDS) / 100  # share of all the machine's cores
        idle = (psutil.cpu_count() or cores) * (1 - busy)
        threads = max(1, min(threads, math.floor(idle + 0.5)))
    torch.set_num_threads(threads)
    return threads


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from (run seed, epoch, rank ...): independent streams, reproducible."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# ------------------------------------------------------------------ model
def architecture_kwargs(config: RunConfig) -> dict:
    """The architecture's full keyword arguments (registry defaults + config), as the model card stores them."""
    spec = get_spec(config.model.name)
    return {**spec.default_kwargs, **config.model.kwargs}


def build_classifier(config: RunConfig, num_classes: int, initial_weights: bool = True) -> Classifier:
    """Build the network named in the config inside a :class:`Classifier` (normalisation in the model).

    ``model.pretrained`` asks timm for its published weights; ``model.weights`` loads a file afterwards.
    ``initial_weights=False`` skips both: a resumed run's checkpoint replaces every weight, so it needs
    neither the file (which may have moved) nor the internet.
    """
    kwargs = architecture_kwargs(config)
    if not initial_weights:
        return Classifier(create_model(config.model.name, num_classes, **kwargs), config.normalize)
    if config.model.pretrained:
        if not config.model.name.startswith("timm/"):
            raise UserError(
                f"model {config.model.name!r} has no published pretrained weights; use a timm/<name> model or "
                "model.weights=FILE"
            )
        try:
            net = create_model(config.model.name, num_classes, pretrained=True, **kwargs)
        except Exception as error:  # noqa: BLE001 - timm raises many kinds when the hub is unreachable
            raise UserError(
                f"could not get pretrained weights for {config.model.name} ({type(error).__name__}: {error}); "
                "without internet pass a local file with model.weights=FILE (--weights FILE)"
            ) from None
    else:
        net = create_model(config.model.name, num_classes, **kwargs)
    if config.model.weights:
        loaded, skipped = load_initial_weights(net, Path(config.model.weights))
        log.info("initial weights from %s: %d tensors loaded, %d skipped (their shape differs: %s)",
                 config.model.weights, loaded, len(skipped), ", ".join(skipped[:8]) + (" ..." if len(skipped) > 8 else "") or "none")  # fmt: skip
    return Classifier(net, config.normalize)


def load_initial_weights(net: torch.nn.Module, path: Path) -> tuple[int, list[str]]:
    """Initialise ``net`` from a weights file; returns how many tensors were loaded and the names of those
    skipped for a shape mismatch.

    Accepts safetensors (a bare network's, a timm checkpoint's or a bloodcell model's, whose ``net.`` keys
    are used), a bloodcell model or run directory (its best checkpoint), and PyTorch ``.pt/.pth/.bin`` files
    read with ``weights_only=True`` (never unpickling code). Tensors whose shape differs, typically the
    classifier head of an ImageNet model, are left at their fresh initialisation; a file of which no weight
    tensor fits (only BatchNorm's scalar counters would, whatever the network) is refused.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from bloodcell.models.card import resolve_model_dir

    if path.is_dir():
        try:
            path = resolve_model_dir(path) / "model.safetensors"
        except FileNotFoundError:
            path = path / "model.safetensors"
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        if path.suffix in {".pt", ".pth", ".bin"}:
            # weights_only: PyTorch's restricted unpickler, which builds tensors and containers, no objects.
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            state = loaded.get("state_dict", loaded.get("model", loaded)) if isinstance(loaded, dict) else loaded
        else:
            state = load_file(str(path), device="cpu")
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError, SafetensorError) as error:
        raise UserError(f"{path}: not a readable weights file ({' '.join(str(error).split())[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: holds no mapping of tensor names to tensors (a state dict), nothing to load")
    if any(key.startswith("net.") for key in state):
        state = {key[4:]: value for key, value in state.items() if key.startswith("net.")}
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not any(v.ndim > 1 for v in usable.values()):  # no convolution or linear weight: a different network
        raise UserError(f"{path}: none of its weight tensors fit the network (is it the same architecture and width?)")
    skipped = sorted(k for k in state if k in own and k not in usable)
    net.load_state_dict(usable, strict=False)
    return len(usable), skipped


def graph_training_forward(
    classifier: Classifier, sample_shape: tuple[int, ...], precision: str, memory_format: torch.memory_format
) -> None:
    """Replay the classifier's training-mode forward and backward as CUDA graphs (changes it in place).

    Why: on a GPU this small network's step is launch-bound. The host's Python issues a few hundred
    small kernels a step and the GPU waits for them (docs/BENCHMARKS.md: the bare step ran 4x faster at
    batch 256 than at 64). :func:`torch.cuda.make_graphed_callables` records them once and replays them
    with one launch each way. Batches must then have ``sample_shape`` (the loop drops the ragged last
    batch), and evaluation mode still runs the ordinary forward. Its warm-up passes on a random batch
    would move the BatchNorm statistics; they are put back, so the run starts from the same state.
    Undo with :func:`release_training_graph`. If recording fails (a network whose forward waits for the
    host, say), the error propagates and the classifier is left as it was.
    """
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    saved = [buffer.clone() for buffer in classifier.buffers()]
    device = next(classifier.parameters()).device
    sample = (torch.rand(sample_shape, device=device) * 255).contiguous(memory_format=memory_format)
    try:
        # Autocast's weight cache must be off while recording (a cached cast would outlive its graph).
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False):
            torch.cuda.make_graphed_callables(classifier, (sample,))
    except BaseException:
        release_training_graph(classifier)
        raise
    finally:
        with torch.no_grad():
            for buffer, value in zip(classifier.buffers(), saved, strict=True):
                buffer.copy_(value)


def release_training_graph(classifier: torch.nn.Module) -> None:
    """Give the classifier back its ordinary forward (and free the graphs' memory)."""
    classifier.__dict__.pop("forward", None)  # make_graphed_callables set an instance attribute


# ------------------------------------------------------------------ optimisation
def build_optimizer(
    model: torch.nn.Module, optimizer: OptimizerConfig, lr: float, fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW (Adam, SGD) with weight decay on weights only: BatchNorm and bias parameters are not decayed.

    ``fused``: one kernel per step for all parameters instead of a dozen (for training on a GPU, where
    each launch costs host time; on the CPU the default implementation is kept, bit for bit).
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": optimizer.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    implementation = True if fused else None  # None is the argument's default: as if not given
    if optimizer.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=implementation)
    if optimizer.name == "adam":
        # Keras-style Adam (the seed replica): L2 penalty in the gradient, as Adam's weight_decay does.
        return torch.optim.Adam(groups, lr=lr, fused=implementation)
    return torch.optim.SGD(groups, lr=lr, momentum=optimizer.momentum, nesterov=True, fused=implementation)


def learning_rate(step: int, total_steps: int, base_lr: float, schedule: ScheduleConfig) -> float:
    """Learning rate at optimiser step ``step`` (0-based): a pure function, so resuming needs only the step.

    - ``onecycle``: cosine warm-up from ``base_lr / 25`` to ``base_lr`` over ``warmup_fraction`` of the run,
      then cosine annealing to ``base_lr / 25e4`` (the shape of ``torch.optim.lr_scheduler.OneCycleLR``).
    - ``cosine``: linear warm-up from ``base_lr / warmup steps``, then cosine annealing to 0.
    - ``constant``: ``base_lr`` throughout (the seed replica).
    """
    if schedule.name == "constant":
        return base_lr
    warmup = int(schedule.warmup_fraction * total_steps)
    if schedule.name == "onecycle":
        start, end = base_lr / 25, base_lr / 25e4
        if step < warmup:
            return _cosine_between(start, base_lr, step / warmup)
        return _cosine_between(base_lr, end, (step - warmup) / max(1, total_steps - warmup))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return _cosine_between(base_lr, 0.0, (step - warmup) / max(1, total_steps - warmup))


def _cosine_between(start: float, end: float, fraction: float) -> float:
    fraction = min(max(fraction, 0.0), 1.0)
    return end + (start - end) * (1 + math.cos(math.pi * fraction)) / 2


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency loss weights ``n / (k * n_c)`` (mean 1 over a balanced set); absent classes get 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed memory for reuse instead of returning it to the system.

    Training allocates and frees the same multi-megabyte tensors every step. By default glibc hands
    blocks that large back to the kernel and takes fresh zeroed pages again on the next step; measured
    here that page-fault traffic cost 1.3-2x in training speed (the effect of ``MALLOC_MMAP_THRESHOLD_`` /
    ``MALLOC_TRIM_THRESHOLD_``, or of jemalloc/tcmalloc, which PyTorch's CPU guides recommend). Returns
    False where the C library is not glibc (macOS, Windows, musl): nothing is changed there.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    ok = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # glibc's maximum on 64-bit
    ok &= libc.mallopt(m_trim_threshold, 1024 * 1024 * 1024)
    return bool(ok)
