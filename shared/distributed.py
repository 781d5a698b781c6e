"""Past one GPU: what a script does differently under `torchrun`, with PyTorch's FSDP2.

Run any algorithm as `torchrun --nproc-per-node N algos/NAME.py ...`. Each process
(rank) holds 1/N of every decoder layer's weights, gradients and AdamW states
(`fully_shard` per layer; a layer's weights are gathered for its forward and backward
only), generates and scores its contiguous 1/N of each step's prompts (a group never
spans two ranks) and computes its share of the loss, normalised by the whole batch's
counts. Gradients are then summed over ranks, so an update equals the single-process
update on the same global batch. Embeddings, the final norm and the LM head stay whole
on every rank (they are used outside the layers' forward: the chunked LM-head
log-probs, the hidden-state heads of GPM and the discriminators), their gradients
all-reduced: for Qwen3-4B that is 0.39B of 4B parameters.

Rank 0 alone claims the run folder, logs, evaluates-and-writes and saves; a
checkpoint is gathered to whole tensors first, so it loads with `from_pretrained`.
Without torchrun every function here is the identity (or does what the single
process did), so single-process runs are unchanged.
"""

import atexit
import os
import sys
import time

import torch
import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


class _ErrorLines:
    """sys.stderr under torchrun. The script's `error: ...` lines (a SystemExit's message)
    are shared so that an error every rank meets is printed once, by rank 0: rank 0
    prints its own and records it in the job's store; another rank holds its own back
    until it leaves (_leave) and prints it only if rank 0's differs, so an error that
    rank alone met is still shown. Before the job is joined only flags are checked,
    the same on every rank, so there a rank other than 0 drops its error lines."""

    def __init__(self, stream):
        self.stream, self.held, self._holding_newline = stream, [], False

    def write(self, text: str) -> int:
        if text.startswith("error: "):
            if rank_from_environment() == 0:
                if dist.is_initialized():
                    dist.distributed_c10d._get_default_store().set("error/0", text)
            else:
                self.held.append(text)
                self._holding_newline = True
                return len(text)
        elif text == "\n" and self._holding_newline:  # the newline Python writes after the message
            self._holding_newline = False
            return 1
        self._holding_newline = False
        return self.stream.write(text)

    def release(self, shown_by_rank_0: str | None) -> None:
        for line in self.held:
            if line != shown_by_rank_0:
                self.stream.write(line + "\n")
        self.held.clear()
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def rank_from_environment() -> int:
    return int(os.environ.get("RANK", "0"))


_joining = False  # set once setup() starts joining the job: errors from then on may differ between ranks


def _drop_flag_errors() -> None:
    if isinstance(sys.stderr, _ErrorLines) and not _joining:
        sys.stderr.held.clear()


if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun rank: from import on, before any flag is checked
    sys.stderr = _ErrorLines(sys.stderr)
    atexit.register(_drop_flag_errors)


def setup(args) -> None:
    """Join the torchrun job, if this process is part of one (torchrun sets WORLD_SIZE):
    gloo on CPU, nccl on GPUs, one GPU per process (args.device becomes cuda:LOCAL_RANK).
    Printing and progress bars are left to rank 0."""
    global _joining
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    _joining = True
    on_gpu = args.device.startswith("cuda")
    if on_gpu:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if on_gpu else "gloo")
    atexit.register(_leave)
    sys.excepthook = _quiet_when_a_peer_is_gone
    if not is_main():  # one copy of every printed line and progress bar; errors still reach stderr
        os.environ["TQDM_DISABLE"] = "1"
        sys.stdout = open(os.devnull, "w")


_finished = False  # set by finish(), the last call of every script's normal path


def finish() -> None:
    """Mark this rank's run as done: at exit it waits for its peers to close the job."""
    global _finished
    _finished = True


def _leave() -> None:
    """At exit, however the script ends. Every leaving rank says so in the job's store.
    A rank that ends normally (finish() was called), or together with all its peers
    (--stop-at-step, an error every rank meets), waits for the others and closes the
    process group: gloo aborts a process whose peers hang up on it mid-teardown. A rank
    that stops alone, on an error only it met, would wait forever: its peers sit inside
    a collective that gloo cannot cancel. It exits at once instead, with status 1, and
    torchrun stops the others; its error line is the job's only one."""
    if not dist.is_initialized():
        return
    store = dist.distributed_c10d._get_default_store()
    store.set(f"left/{rank()}", "1")
    deadline = time.time() + (300 if _finished else 5)
    while not all(store.check([f"left/{r}"]) for r in range(world_size())):
        if time.time() > deadline:
            sys.stdout.flush()
            if isinstance(sys.stderr, _ErrorLines):
                sys.stderr.release(None)  # rank 0 is still running: this rank's error is the job's
            sys.stderr.flush()
            os._exit(1)
        time.sleep(0.05)
    if isinstance(sys.stderr, _ErrorLines) and sys.stderr.held:
        sys.stderr.release(store.get("error/0").decode() if store.check(["error/0"]) else None)
    dist.destroy_process_group()


def _quiet_when_a_peer_is_gone(kind, error, trace) -> None:
    """A rank whose collective failed because a peer exited (that peer printed the
    job's error) leaves without a traceback of its own."""
    if isinstance(error, dist.DistError) or "Connection closed by peer" in str(error) or "Connection reset" in str(error):
        sys.stderr.flush()
        os._exit(1)
    sys.__excepthook__(kind, error, trace)


def check_divisible(count: int, what: str) -> None:
    """A per-step count that is split over ranks must split evenly."""
    if count % world_size():
        raise SystemExit(f"error: {what} ({count}) must be a multiple of the number of processes ({world_size()}) "
                         "under torchrun")


def shard(model):
    """FSDP2 on each decoder layer (no-op in a single process). Returns the model."""
    if world_size() > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(next(model.parameters()).device.type, (world_size(),))
        for layer in model.get_decoder().layers:  # get_decoder(): also through a peft (LoRA) wrapper
            fully_shard(layer, mesh=mesh)
    return model


def optimizer_groups(model, *heads) -> list[dict]:
    """AdamW's parameter groups: the decoder layers' parameters (what shard() shards) and
    the rest (embeddings, final norm, LM head, and any extra `heads`), the same two
    groups with or without torchrun, so either can resume the other. Under FSDP2 the
    first are DTensors and the rest plain tensors, and AdamW's foreach update (its
    default on CUDA) fails on a group that mixes the two."""
    in_layers = {id(p) for p in model.get_decoder().layers.parameters()}
    trained = [p for p in model.parameters() if p.requires_grad]  # with LoRA, the adapters only
    sharded = [p for p in trained if id(p) in in_layers]
    whole = [p for p in trained if id(p) not in in_layers] + [p for head in heads for p in head.parameters()]
    return [{"params": group} for group in (sharded, whole) if group]


def local_share(items):
    """This rank's contiguous 1/N of a list or tensor (dim 0)."""
    size = len(items) // world_size()
    return items[rank() * size:(rank() + 1) * size]


def _communicable(tensor: torch.Tensor) -> torch.Tensor:
    """nccl moves CUDA tensors only, gloo CPU ones."""
    on_gpu = dist.get_backend() == "nccl"
    return tensor.to(torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu"))


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """The ranks' equal-sized tensors, concatenated along dim 0 in rank order."""
    if world_size() == 1:
        return tensor
    local = _communicable(tensor.contiguous())
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(tensor.device)


def gather_objects(items: list) -> list:
    """The ranks' lists, concatenated in rank order (texts, per-row numbers)."""
    if world_size() == 1:
        return items
    parts = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def all_sum(value):
    """The sum over ranks of a number or tensor (a tensor comes back, a float for a float)."""
    if world_size() == 1:
        return value
    tensor = _communicable(torch.as_tensor(value, dtype=torch.float64 if isinstance(value, float) else None).clone())
    dist.all_reduce(tensor)
    return float(tensor) if isinstance(value, float) else tensor.to(value.device)


def any_rank(flag: bool) -> bool:
    """True when the flag is true on some rank (used to keep decode loops in step)."""
    if world_size() == 1:
        return flag
    tensor = _communicable(torch.tensor([float(flag)]))
    dist.all_reduce(tensor)
    return bool(tensor.item() > 0)


def broadcast_object(obj):
    """Rank 0's object, on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_gradients_and_clip(parameters, max_norm: float) -> torch.Tensor:
    """Sum gradients over ranks, then clip them to a total norm of max_norm; returns the
    norm before clipping, as torch.nn.utils.clip_grad_norm_ (which this is, in a single
    process). FSDP2 has averaged the sharded layers' gradients: times N makes the sum.
    The whole parameters' gradients are all-reduced."""
    parameters = [p for p in parameters if p.grad is not None]
    if world_size() == 1:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    from torch.distributed.tensor import DTensor
    squares = torch.zeros((), dtype=torch.float64, device=parameters[0].grad.device if parameters else "cpu")
    sharded_squares = torch.zeros_like(squares)
    for p in parameters:
        if isinstance(p.grad, DTensor):
            p.grad.mul_(world_size())
            sharded_squares += p.grad.to_local().double().pow(2).sum()
        else:
            dist.all_reduce(p.grad)
            squares += p.grad.double().pow(2).sum()
    dist.all_reduce(sharded_squares)
    norm = (squares + sharded_squares).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in parameters:
        p.grad.mul_(scale.to(p.grad.dtype))
    return norm.float()


def full_state_dict(model) -> dict:
    """The model's whole tensors on CPU, on rank 0 (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def whole_optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with every sharded state tensor gathered whole, on rank 0
    (a collective): the format a single process saves, so either can resume the other."""
    from torch.distributed.tensor import DTensor
    state = optimizer.state_dict()
    whole = {}
    for index, param_state in state["state"].items():
        whole[index] = {}
        for key, value in param_state.items():
            if isinstance(value, DTensor):
                value = value.full_tensor().cpu()
            whole[index][key] = value
    return {**state, "state": whole if is_main() else {}}


def load_optimizer_state(optimizer, state: dict) -> None:
    """Restore an optimizer saved by save_checkpoint (by one process or many): each rank
    keeps its shard of every state tensor of a sharded parameter."""
    saved, ours = [len(g["params"]) for g in state["param_groups"]], [len(g["params"]) for g in optimizer.param_groups]
    if saved != ours:
        raise SystemExit(f"error: the checkpoint's optimizer has parameter groups of {saved} tensors, this run's "
                         f"{ours}: it was saved for another model or by an older version of this code, so it "
                         "cannot be resumed (the checkpoint is left as it is)")
    if world_size() > 1:
        from torch.distributed.tensor import DTensor, distribute_tensor
        params = [p for group in optimizer.param_groups for p in group["params"]]
        local = {}
        for index, param_state in state["state"].items():
            param = params[index]
            local[index] = {key: distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                                   src_data_rank=None)
                            if isinstance(param, DTensor) and value.dim() > 0 else value
                            for key, value in param_state.items()}
        state = {**state, "state": local}
    optimizer.load_state_dict(state)
