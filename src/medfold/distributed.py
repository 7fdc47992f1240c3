"""Data-parallel training with Horovod or torch DDP, one process per GPU (or per CPU slot, gloo).

The set-up is read from the environment a launcher leaves: ``horovodrun`` (Horovod's own),
``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or ``srun`` (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID, mapped onto torchrun's names for DDP). Semantics, the same for both
backends:

* every rank starts from rank 0's weights and optimizer state (Horovod: broadcast; DDP: its
  constructor broadcasts the parameters, and the optimizer is freshly built on all ranks);
* gradients are averaged across ranks at every step (Horovod's DistributedOptimizer; DDP's
  all-reduce), so a step with batch B per rank on N ranks equals one step with batch N*B;
* each epoch's data order comes from (seed, epoch), the same on every rank, and each rank takes
  every N-th image of it (the tail wrapped around so all ranks take the same number of steps),
  which is what DistributedSampler with ``set_epoch`` does;
* the learning rate is multiplied by the world size (Goyal et al. 2017; the thesis behind this
  project does the same: LR_parallel = LR x p) unless ``distributed.scale_lr`` is false;
* the training loss is averaged across ranks before logging; validation runs on every rank over
  the whole validation fold, so early stopping and the LR schedule decide the same everywhere;
* only rank 0 writes checkpoints, logs, TensorBoard events and results.
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)


class Single:
    """One process: the interface every backend has, doing nothing across ranks."""

    name = "none"

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @property
    def backend(self) -> str:
        return self.name

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device_for(self, device: torch.device) -> torch.device:
        return device

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        """The model to step with and the optimizer to step, both averaging gradients across ranks."""
        return model, optimizer

    def mean(self, value: float) -> float:
        """``value`` averaged over ranks."""
        return value

    def average_buffers(self, model: torch.nn.Module) -> None:
        """Average floating-point buffers (batch-norm running statistics) across ranks: each rank's
        were updated from its own batches, and validation must see the same model everywhere."""
        for name, buffer in model.named_buffers():
            if buffer.is_floating_point():
                self._average_buffer(name, buffer)

    def _average_buffer(self, name: str, buffer: torch.Tensor) -> None:
        pass

    def replicas_identical(self, model: torch.nn.Module) -> bool:
        """True when every rank holds the same weights, byte for byte (checked at the end of training)."""
        return len(set(self._gather(weights_digest(model)))) == 1

    def _gather(self, value: str) -> list[str]:
        return [value]

    def barrier(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class _Parallel(Single):
    def device_for(self, device: torch.device) -> torch.device:
        return torch.device("cuda", self.local_rank) if device.type == "cuda" else device


class Horovod(_Parallel):
    name = "horovod"

    def __init__(self):
        try:
            import horovod.torch as hvd
        except ImportError as err:
            raise ConfigError(
                "distributed.backend is horovod but Horovod is not installed; run "
                "install/horovod.sh (see docs/cluster.md) or use backend: ddp"
            ) from err
        self.hvd = hvd
        hvd.init()
        super().__init__(hvd.rank(), hvd.size(), hvd.local_rank())

    def wrap(self, model, optimizer, device):
        optimizer = self.hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        return model, optimizer

    def mean(self, value: float) -> float:
        return float(self.hvd.allreduce(torch.tensor([value], dtype=torch.float64), op=self.hvd.Average, name="mean"))

    def _average_buffer(self, name, buffer) -> None:
        buffer.copy_(self.hvd.allreduce(buffer.detach(), op=self.hvd.Average, name=f"buffer.{name}"))

    def _gather(self, value: str) -> list[str]:
        return self.hvd.allgather_object(value)

    def barrier(self) -> None:
        self.hvd.barrier()

    def shutdown(self) -> None:
        self.hvd.shutdown()


class DDP(_Parallel):
    name = "ddp"

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist = dist
        _slurm_to_torchrun_env()
        if "WORLD_SIZE" not in os.environ:
            raise ConfigError(
                "distributed.backend is ddp but no launcher set WORLD_SIZE; start training with "
                "torchrun or srun (the train rule does this)"
            )
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        super().__init__(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))

    def wrap(self, model, optimizer, device):
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids), optimizer

    def mean(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64)
        self.dist.all_reduce(tensor)
        return float(tensor) / self.world

    def _average_buffer(self, name, buffer) -> None:
        self.dist.all_reduce(buffer.data)
        buffer.data.div_(self.world)

    def _gather(self, value: str) -> list[str]:
        values = [None] * self.world
        self.dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        self.dist.barrier()

    def shutdown(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def _slurm_to_torchrun_env() -> None:
    """Under ``srun`` (one task per GPU) without torchrun, give DDP the variables it reads."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1"))
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", os.environ.get("MEDFOLD_MASTER_ADDR", "127.0.0.1"))
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def init(backend: str, device: torch.device) -> Single:
    """Join the process group of ``backend``; a single process needs no launcher."""
    if backend == "none":
        return Single()
    if backend == "horovod":
        ctx = Horovod()
    elif backend == "ddp":
        ctx = DDP(device)
    else:
        raise ConfigError(f"distributed.backend: {backend!r} is not one of none, horovod, ddp")
    if device.type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    log.info("rank %d of %d (%s, local rank %d)", ctx.rank, ctx.world, ctx.backend, ctx.local_rank)
    return ctx


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- launching
def in_slurm_job() -> bool:
    return any(k in os.environ for k in ("SLURM_JOB_ID", "SLURM_JOBID"))


def launch_command(backend: str, processes: int, launcher: str, gpus_per_process: int, module: list[str]) -> list[str]:
    """The command that starts ``processes`` copies of ``python -m <module...>``.

    Under Slurm, DDP starts one task per process with ``srun`` (its rank from SLURM_PROCID).
    Horovod built with gloo only (install/horovod.sh) has no PMI support, so it runs
    ``horovodrun --gloo`` on the job's node: srun-started Horovod needs an MPI build."""
    import shutil
    import sys
    from pathlib import Path

    use_srun = launcher == "srun" or (launcher == "auto" and in_slurm_job())
    if backend == "ddp" and use_srun:
        return [
            "srun",
            "-n",
            str(processes),
            "--kill-on-bad-exit=1",
            *(["--gpus-per-task=1"] if gpus_per_process else []),
            sys.executable,
            "-m",
            *module,
        ]
    if backend == "ddp":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
            "-m",
            *module,
        ]
    if backend == "horovod":
        horovodrun = shutil.which("horovodrun") or str(Path(sys.executable).parent / "horovodrun")
        if not Path(horovodrun).exists():
            raise ConfigError("distributed.backend is horovod but horovodrun is not installed; run install/horovod.sh")
        return [
            horovodrun,
            "-np",
            str(processes),
            "-H",
            f"localhost:{processes}",
            "--gloo",
            sys.executable,
            "-m",
            *module,
        ]
    raise ConfigError(f"distributed.backend: {backend!r} needs no launcher")


def launcher_rank() -> int:
    """This process's rank as its launcher set it, before any process group exists."""
    for key in ("RANK", "HOROVOD_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0
