"""
Runtime plumbing the scripts share: errors, device and precision, several
processes under torchrun, stop signals, the training log. Nothing here knows
about models or data.
"""

import gc
import os
import signal
import sys
import threading
from contextlib import nullcontext

import torch
import torch.distributed as dist


def die(msg):
    """A problem the user can fix: one line on stderr, exit status 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# -----------------------------------------------------------------------------
# device and precision

def pick_device(requested):
    """cuda -> mps -> cpu unless told otherwise; returns (device, reason)."""
    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            die("--device cuda requested but CUDA is not available")
        if requested == "mps" and not torch.backends.mps.is_available():
            die("--device mps requested but MPS is not available")
        return requested, "requested"
    if torch.cuda.is_available():
        return "cuda", "CUDA is available"
    if torch.backends.mps.is_available():
        return "mps", "Apple MPS is available"
    return "cpu", "no GPU found"


def pick_dtype(requested, device):
    """auto: bf16 on CUDA that supports it, fp16 (+GradScaler) on older CUDA,
    fp32 on CPU and MPS (bf16 matmuls are ~3x slower than fp32 on our CPUs)."""
    if requested != "auto":
        return requested, "requested"
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "CUDA GPU supports bf16"
        return "float16", "CUDA GPU without bf16: fp16 with a GradScaler"
    return "float32", f"{device}: reduced precision is slower or unsupported here"


def autocast_ctx(device, dtype):
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


# -----------------------------------------------------------------------------
# several processes (torchrun + DistributedDataParallel)

def init_distributed(device):
    """Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE set) join the process group:
    nccl with one GPU per process (cuda:LOCAL_RANK), gloo on the CPU.
    Returns (rank, world_size, device); without torchrun (0, 1, device) and
    nothing else happens."""
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device == "cpu":
        backend = "gloo"
    else:
        die(f"several processes on {device} are not supported: use --device cpu (gloo) or cuda (nccl)")
    if not dist.is_initialized():   # a second call (distill.py's hard mode, then train.run) joins once
        dist.init_process_group(backend)
    return rank, world, device


def leave_distributed(clean):
    """Leave the process group, every rank at the same moment.

    clean: the loop ended the same way on every rank (done, --stop_at, or a stop
    all ranks agreed on), so a barrier is safe: no rank tears down its
    connections while another still saves or talks. After an error on one rank
    a barrier could wait forever, so it is skipped (torchrun stops the others).

    The DDP wrapper sits in a reference cycle (module hooks refer back to it), so
    it outlives main() until some garbage collection, possibly during interpreter
    shutdown, when its reducer would release the gloo process group while the
    runtime is being torn down; a rank dying at exit with "terminate called
    without an active exception" (SIGABRT, about one run in ten) fits that. So
    the caller drops its last reference to the wrapper first, and it is collected
    here, while everything is alive, before the group is destroyed."""
    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def sum_over_ranks(values, device):
    """A few numbers summed over all processes (every rank must call this at the
    same point); in a single process, the numbers themselves."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


# -----------------------------------------------------------------------------
# stopping and logging

def catch_stop_signals():
    """SIGTERM (a scheduler, or torchrun passing a Ctrl-C on) and Ctrl-C ask the
    loop to stop: it finishes the step it is in, all processes agree to stop at
    the same step (one rank cannot save while another is mid-all-reduce), and
    rank 0 saves last.pt once. A second signal quits at once without saving.
    Returns (event set by the first signal, function restoring the old handlers)."""
    stop = threading.Event()

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
    old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) is not signal.SIG_IGN:   # a background run ignores Ctrl-C: keep it so
            old[sig] = signal.signal(sig, handler)

    def restore():
        for sig, h in old.items():
            signal.signal(sig, h)
    return stop, restore


class Logger:
    """Prints a line and appends it to out_dir/log.txt (rank 0 only: the others
    are not active)."""

    def __init__(self, out_dir, active=True):
        self.path = os.path.join(out_dir, "log.txt")
        self.active = active

    def __call__(self, line):
        if not self.active:
            return
        print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def restart(self):
        """A fresh run starts a fresh log (its best/last checkpoints are replaced too)."""
        if self.active:
            open(self.path, "w").close()
