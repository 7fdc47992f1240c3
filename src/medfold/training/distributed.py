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

from medfold.core.errors import ConfigError

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

    def nodes(self) -> int:
        """How many machines the ranks run on (distinct host names)."""
        import socket

        return len(set(self._gather(socket.gethostname())))

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
        _slurm_to_horovod_env()
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
        """Every rank waits for the others before any tears the group down: rank 0 holds the
        TCP store, and a rank that destroys its group or exits while a peer is still in its last
        collective or its own teardown leaves that peer's gloo threads reading a closed socket
        (under srun the step is then killed for all). A barrier that fails (a peer already gone)
        does not stop this rank's teardown."""
        if not self.dist.is_initialized():
            return
        try:
            self.dist.barrier()
        except Exception as exc:  # a peer already gone: tear down all the same
            log.warning("distributed: the closing barrier failed (%s); tearing down all the same", exc)
        self.dist.destroy_process_group()


def _slurm_to_torchrun_env() -> None:
    """Under ``srun`` (one task per GPU) without torchrun, give DDP the variables it reads.

    The rendezvous (torch's TCP store, held by rank 0) is at the first node of the step, where
    srun's block distribution puts rank 0: on one node its loopback address, on several the
    first host of SLURM_STEP_NODELIST, which every node resolves (MEDFOLD_MASTER_ADDR overrides
    it, for a cluster whose node names resolve to the wrong network). The port comes from the
    job ID, the same on every rank."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = str(_slurm_tasks())
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", os.environ.get("MEDFOLD_MASTER_ADDR") or rendezvous_host())
    os.environ.setdefault("MASTER_PORT", str(rendezvous_port()))


def _slurm_tasks() -> int:
    """The tasks of this srun step (its world size)."""
    return int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1")))


def _slurm_nodes() -> int:
    """The nodes this srun step runs on."""
    return int(os.environ.get("SLURM_STEP_NUM_NODES", os.environ.get("SLURM_NNODES", "1")))


def rendezvous_host() -> str:
    """Where rank 0 of this srun step runs, as the other nodes reach it."""
    nodes = _slurm_nodes()
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_NODELIST")
    if nodes <= 1 or not nodelist:
        return "127.0.0.1"
    return first_host(nodelist)


def rendezvous_port(offset: int = 0) -> int:
    return 20000 + (int(os.environ.get("SLURM_JOB_ID", "0")) + offset) % 20000


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list: ``gpu[07-09,12],cpu3`` -> ``gpu07``, ``a[1-2]-b[3-4]``
    -> ``a1-b3`` (what ``scontrol show hostnames`` prints first, without a call to it)."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]
    while "[" in first:
        start, stop = first.index("["), first.index("]")
        ranges = first[start + 1 : stop]
        first = first[:start] + ranges.split(",")[0].split("-")[0] + first[stop + 1 :]
    return first


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


def uses_srun(backend: str, launcher: str, nodes: int = 1) -> bool:
    """Whether srun starts the processes, one Slurm task each: DDP inside a Slurm job (or when
    asked), and Horovod on more than one node or when asked. Horovod on one node otherwise runs
    ``horovodrun --gloo`` inside the job's one task."""
    if backend == "horovod":
        return nodes > 1 or launcher == "srun"
    return nodes > 1 or launcher == "srun" or (launcher == "auto" and in_slurm_job())


def launch_command(
    backend: str, processes: int, launcher: str, gpus_per_process: int, module: list[str], nodes: int = 1
) -> list[str]:
    """The command that starts ``processes`` copies of ``python -m <module...>``, over ``nodes``.

    Under srun (``uses_srun``): one task per process, ``processes / nodes`` on each node in block
    order (so rank 0 is on the step's first node, where the rendezvous is), its rank from
    SLURM_PROCID. Horovod built with gloo only (install/horovod.sh) has no PMI support: under srun
    it meets at a rendezvous server that ``launch`` starts (``horovod_rendezvous``)."""
    import shutil
    import sys
    from pathlib import Path

    if backend not in ("ddp", "horovod"):
        raise ConfigError(f"distributed.backend: {backend!r} needs no launcher")
    if uses_srun(backend, launcher, nodes):
        return [
            "srun",
            "-N",
            str(nodes),
            "-n",
            str(processes),
            f"--ntasks-per-node={processes // nodes}",
            "--distribution=block",
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


def launch(backend: str, processes: int, launcher: str, gpus_per_process: int, module: list[str], nodes: int = 1):
    """Run ``launch_command``'s command to its end; returns its exit status. Horovod under srun
    gets its rendezvous server here, in this process, for as long as the processes run."""
    import shutil
    import subprocess

    command = launch_command(backend, processes, launcher, gpus_per_process, module, nodes)
    if command[0] == "srun" and not shutil.which("srun"):
        raise ConfigError(
            f"distributed: {processes} {backend} processes on {nodes} node(s) are started with Slurm's srun, "
            f"which is not installed here; run the workflow with --profile slurm, or use nodes: 1 and launcher: local"
        )
    server, env = None, None
    if backend == "horovod" and command[0] == "srun":
        server, env = horovod_rendezvous(processes, nodes)
    log.info("launching %d %s processes on %d node(s): %s", processes, backend, nodes, " ".join(command))
    for handler in logging.getLogger().handlers:
        handler.flush()
    try:
        return subprocess.run(command, env=env).returncode
    finally:
        if server is not None:
            server.stop()


def horovod_rendezvous(processes: int, nodes: int):
    """Start Horovod's HTTP rendezvous server (the one horovodrun starts for gloo) for ``processes``
    ranks, ``processes / nodes`` per node; returns it and the environment that tells srun's tasks
    where it is. Each task then takes its ranks from Slurm (``_slurm_to_horovod_env``). Nodes are
    named node0, node1, ... after SLURM_NODEID, which both sides know without asking Slurm."""
    import socket

    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
    from horovod.runner.http.http_server import RendezvousServer

    address = os.environ.get("MEDFOLD_RENDEZVOUS_ADDR") or socket.gethostbyname(socket.gethostname())
    if address.startswith("127.") and nodes > 1:
        raise ConfigError(
            f"horovod on {nodes} nodes: this node's name ({socket.gethostname()}) resolves to the loopback "
            f"address {address}, which the other nodes cannot reach; set MEDFOLD_RENDEZVOUS_ADDR to its address"
        )
    per_node = processes // nodes
    server = RendezvousServer()
    port = server.start()
    server.init(get_host_assignments(parse_hosts(",".join(f"node{i}:{per_node}" for i in range(nodes))), processes))
    env = {
        **os.environ,
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": address,
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
    }
    return server, env


def _slurm_to_horovod_env() -> None:
    """Under srun with a rendezvous server (``horovod_rendezvous``), give Horovod the slot
    variables horovodrun would have set, from the task's Slurm variables, and the network
    interface gloo binds to: the one this node reaches the rendezvous server through."""
    env = os.environ
    if "HOROVOD_RANK" in env or "SLURM_PROCID" not in env or "HOROVOD_GLOO_RENDEZVOUS_ADDR" not in env:
        return
    size, nodes = _slurm_tasks(), _slurm_nodes()
    node = env.get("SLURM_NODEID", "0")
    env.update(
        {
            "HOROVOD_RANK": env["SLURM_PROCID"],
            "HOROVOD_SIZE": str(size),
            "HOROVOD_LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "HOROVOD_LOCAL_SIZE": str(size // nodes),
            "HOROVOD_CROSS_RANK": node,
            "HOROVOD_CROSS_SIZE": str(nodes),
            "HOROVOD_HOSTNAME": f"node{node}",
        }
    )
    env.setdefault("HOROVOD_GLOO_IFACE", interface_towards(env["HOROVOD_GLOO_RENDEZVOUS_ADDR"]))


def interface_towards(address: str) -> str:
    """The name of this machine's network interface that traffic to ``address`` leaves by."""
    import socket

    import psutil  # installed with Horovod (install/horovod.sh)

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((address, 9))  # a UDP connect sends nothing; it only picks the route
        local = probe.getsockname()[0]
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addresses):
            return name
    raise ConfigError(f"horovod: no network interface holds {local}, this node's address towards {address}")


def launcher_rank() -> int:
    """This process's rank as its launcher set it, before any process group exists."""
    for key in ("RANK", "HOROVOD_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0
