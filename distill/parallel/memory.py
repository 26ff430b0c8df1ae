"""Long-context memory savers for the decoder layers: offloaded checkpoints and a tiled MLP.

At 512K tokens and beyond, what gradient checkpointing leaves on the GPU is dominated by two things: every
layer's checkpointed input (layers x tokens x hidden) and, inside the one layer being recomputed, the MLP's
(tokens, intermediate) tensors (for Llama-3-8B the intermediate is 3.5x the hidden size, and the MLP saves
four of them). ALST (Snowflake's Arctic Long Sequence Training, arXiv 2506.13996) removes both, and so does
this module:

- `parallel.offload_activations`: each checkpointed layer's input is copied to (pinned) host memory as it is
  saved and copied back when backward recomputes the layer. It is a saved-tensor hook pair
  (`torch.autograd.graph.saved_tensors_hooks`) around the layer's non-reentrant `torch.utils.checkpoint`:
  that checkpoint saves its positional inputs (the hidden states; everything else is bound in a partial)
  through the hooks that are active when it is called, and its own hooks take over inside the layer, so our
  pair sees exactly the checkpointed input and nothing else. A hook pair rather than a checkpoint of our own
  keeps torch's non-reentrant checkpoint (gradients into parameters as usual: DDP, FSDP2 and ZeRO-3 hooks keep
  working, determinism checks and RNG replay stay torch's). Rather than transformers'
  `activation_checkpointing_enable(offload=True)` (torch's `save_on_cpu`), the copy runs on a side CUDA stream
  so the device-to-host transfer overlaps the next layer's forward, and it applies only to the streams that
  need it (the long one), not to every short micro-batch. On a CPU it is the same code path: a real copy
  into a separate host buffer and a real copy back, so tests see the exact arithmetic a GPU run does.
- `parallel.tiled_mlp`: `TiledMLP`, an autograd Function that runs the MLP module over N sequence chunks
  without saving anything but its input, and in backward recomputes one chunk at a time and takes that
  chunk's gradients, so at most (tokens/N, intermediate) tensors exist at once.

Both act only inside `scope()` (entered by the step around a long stream's forward and backward, where the
checkpointed layers are recomputed), through wrappers that `install` puts on the decoder layers once.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch

logger = logging.getLogger(__name__)

_ACTIVE: dict | None = None
"""The settings in force inside `scope()`, None outside. A process-wide global, not a thread-local: the GPU
autograd engine recomputes checkpointed layers on its own device threads."""


@contextlib.contextmanager
def scope(offload: bool, chunks: int):
    """Forwards and backwards inside this block offload checkpointed layer inputs (`offload`) and run the
    decoder layers' MLPs in `chunks` sequence chunks (1: whole)."""
    global _ACTIVE
    previous = _ACTIVE
    _ACTIVE = {"offload": offload, "chunks": chunks}
    try:
        yield
    finally:
        _ACTIVE = previous


# ----------------------------------------------------------------------------------------------------------
# offloaded checkpoints
# ----------------------------------------------------------------------------------------------------------
class HostOffload:
    """The saved-tensor hook pair that keeps checkpointed layer inputs in host memory.

    `pack` copies a device tensor into a host buffer (pinned on CUDA, on a side stream; the source's memory
    is kept from reuse until the copy ends by `record_stream`) and returns the buffer; `unpack` waits for that
    copy and brings the tensor back to its device for the recompute. `host_bytes` counts what the buffers hold
    now and `peak_host_bytes` the most they held (the planner's host term is checked against it).
    """

    def __init__(self):
        self.host_bytes = 0
        self.peak_host_bytes = 0
        self._stream = None

    def _side_stream(self, device: torch.device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def pack(self, tensor: torch.Tensor):
        device = tensor.device
        cuda = device.type == "cuda"
        host = torch.empty(tensor.shape, dtype=tensor.dtype, layout=tensor.layout, device="cpu",
                           pin_memory=cuda)
        event = None
        if cuda:
            stream = self._side_stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))  # written on the compute stream
            with torch.cuda.stream(stream):
                host.copy_(tensor, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            tensor.record_stream(stream)  # its memory is not reused before the copy has read it
        else:
            host.copy_(tensor)
        nbytes = host.numel() * host.element_size()
        self.host_bytes += nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
        return _Offloaded(self, host, device, event, tensor.requires_grad, nbytes)

    @staticmethod
    def unpack(packed) -> torch.Tensor:
        return packed.restore()


class _Offloaded:
    """One offloaded tensor: its host copy, where it came from, and the copy's completion event."""

    __slots__ = ("owner", "host", "device", "event", "requires_grad", "nbytes")

    def __init__(self, owner, host, device, event, requires_grad, nbytes):
        self.owner, self.host, self.device, self.event = owner, host, device, event
        self.requires_grad, self.nbytes = requires_grad, nbytes

    def restore(self) -> torch.Tensor:
        if self.event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.event)  # the host copy is complete
            back = self.host.to(self.device, non_blocking=True)
        else:
            back = self.host.clone()  # a copy back, as on a GPU: the recompute never owns the host buffer
        return back

    def __del__(self):
        self.owner.host_bytes -= self.nbytes  # the graph let go of it (after its backward)


OFFLOAD = HostOffload()
"""The process's hook pair (its byte counters are what benchmarks and tests read)."""


def _offloaded_checkpoint(checkpoint, function, *args, **kwargs):
    """The layer's checkpoint function, with its saved inputs in host memory inside an offloading scope."""
    if _ACTIVE is None or not _ACTIVE["offload"] or not torch.is_grad_enabled():
        return checkpoint(function, *args, **kwargs)
    with torch.autograd.graph.saved_tensors_hooks(OFFLOAD.pack, OFFLOAD.unpack):
        return checkpoint(function, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# tiled MLP
# ----------------------------------------------------------------------------------------------------------
class TiledMLP(torch.autograd.Function):
    """`mlp(x)` over `chunks` pieces of the sequence dimension, saving only `x`.

    Forward runs each chunk without a graph; backward recomputes one chunk at a time under the forward's
    autocast state and takes the gradients of its input and of the MLP's parameters (passed in as inputs, so
    that autograd accumulates them into `.grad` the usual way: sharding wrappers see nothing unusual). The
    MLP must act on each token independently (every gated MLP of Llama, Qwen2 and Mistral does).

    Args (of `apply`):
        x: (B, T, H) the MLP's input (the post-attention norm's output).
        run: the MLP module's own (untiled) forward.
        chunks: pieces along T.
        *params: the module's parameters that require grad (what `run` reads).

    Returns:
        (B, T, H) the MLP's output.
    """

    @staticmethod
    def forward(ctx, x, run, chunks, *params):
        device = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device), device)
        ctx.run, ctx.chunks, ctx.params = run, chunks, params
        ctx.save_for_backward(x)
        with torch.no_grad():
            pieces = [run(piece) for piece in x.chunk(chunks, dim=-2)]  # each (B, T/N, H)
        return torch.cat(pieces, dim=-2)  # (B, T, H)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        enabled, dtype, device = ctx.autocast
        params = list(ctx.params)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_params = [None] * len(params)
        start = 0
        for piece, grad_piece in zip(x.chunk(ctx.chunks, dim=-2), grad_out.chunk(ctx.chunks, dim=-2)):
            piece = piece.detach().requires_grad_(ctx.needs_input_grad[0])
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                out = ctx.run(piece)  # (B, t, H): this chunk's intermediates only
            wanted = ([piece] if ctx.needs_input_grad[0] else []) + params
            grads = torch.autograd.grad(out, wanted, grad_piece, allow_unused=True)
            if ctx.needs_input_grad[0]:
                grad_x.narrow(-2, start, piece.shape[-2]).copy_(grads[0])
                grads = grads[1:]
            for i, g in enumerate(grads):
                if g is not None:
                    grad_params[i] = g if grad_params[i] is None else grad_params[i] + g
            start += piece.shape[-2]
            del out, grads
        return (grad_x, None, None, *grad_params)


def _tiled_forward(mlp, plain_forward):
    """`mlp.forward` that tiles inside a scope with chunks > 1 (and when a graph is being built)."""
    def forward(x):
        chunks = _ACTIVE["chunks"] if _ACTIVE is not None else 1
        chunks = min(chunks, x.shape[-2])
        if chunks <= 1 or not torch.is_grad_enabled():
            return plain_forward(x)
        params = [p for p in mlp.parameters() if p.requires_grad]
        return TiledMLP.apply(x, plain_forward, chunks, *params)

    return forward


def install(model, offload: bool, tiled: bool) -> int:
    """Put the wrappers on `model`'s decoder layers (after gradient checkpointing is enabled, before any
    sharding); they act only inside `scope()`. Returns how many layers were wrapped.

    Raises:
        ValueError: the model has no decoder layers with an `mlp` (tiling), or none checkpointed (offload).
    """
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    wrapped = 0
    for layer in layers:
        if offload:
            checkpoint = getattr(layer, "_gradient_checkpointing_func", None)
            if checkpoint is None:
                raise ValueError(f"{type(layer).__name__} is not checkpointed: offloading needs "
                                 f"gradient checkpointing")
            layer._gradient_checkpointing_func = _partial(_offloaded_checkpoint, checkpoint)
        if tiled:
            mlp = getattr(layer, "mlp", None)
            if mlp is None:
                raise ValueError(f"{type(layer).__name__} has no mlp to tile")
            mlp.forward = _tiled_forward(mlp, mlp.forward)
        wrapped += 1
    if (offload or tiled) and not wrapped:
        raise ValueError(f"{type(model).__name__}: no decoder layers found")
    return wrapped


def _partial(fn, first):
    def bound(*args, **kwargs):
        return fn(first, *args, **kwargs)

    return bound


def install_savers(model, parallel) -> tuple[bool, int] | None:
    """The recipe's savers (`parallel.offload_activations`, `parallel.tiled_mlp`) on the student: installs the
    wrappers and returns the `scope` arguments for the long stream, or None when both are off."""
    chunks = resolve_chunks(parallel.tiled_mlp, model.config.hidden_size, model.config.intermediate_size)
    if not parallel.offload_activations and chunks <= 1:
        return None
    layers = install(model, parallel.offload_activations, chunks > 1)
    what = (["checkpointed inputs offloaded to host"] if parallel.offload_activations else []) + \
        ([f"MLP in {chunks} sequence chunks"] if chunks > 1 else [])
    logger.info("long stream: %s over %d decoder layers", " and ".join(what), layers)
    return parallel.offload_activations, chunks


class FinalState:
    """The decoder's final-norm output of a forward, taken by a forward hook, for a stream whose losses read
    only that state: `output_hidden_states=True` would keep every layer's output alive until the forward
    returns, which under offloaded checkpoints is exactly what was moved off the device (the same tensors)."""

    def __init__(self, model):
        self.value: torch.Tensor | None = None
        self._norm = model.get_decoder().norm

    def __enter__(self):
        def grab(module, args, output):
            self.value = output

        self._handle = self._norm.register_forward_hook(grab)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


def auto_chunks(hidden: int, intermediate: int) -> int:
    """`parallel.tiled_mlp: auto`: the chunks that bring a chunk's MLP intermediates (four tensors of
    `intermediate` per token: gate, up, their activation and product) down to one residual's size."""
    return max(1, math.ceil(4 * intermediate / hidden))


def resolve_chunks(setting, hidden: int, intermediate: int) -> int:
    """parallel.tiled_mlp as a number of MLP chunks (1: off): "auto" is `auto_chunks`. The trainer
    (`distill.parallel.memory.install_savers`) and the planner resolve it here alike."""
    return auto_chunks(hidden, intermediate) if setting == "auto" else int(setting)


def long_streams(seq_lens: dict[str, int]) -> set[str]:
    """The streams the memory savers act on (`distill.parallel.memory`): those with the longest rows."""
    longest = max(seq_lens.values())
    return {name for name, n in seq_lens.items() if n == longest}


MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_host_memory(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Have glibc's malloc serve every host allocation of `threshold` bytes or more with its own mmap, so a
    freed tensor's pages go back to the system at once. By default the threshold adapts upwards to the sizes
    freed (up to 32 MiB), after which mid-sized tensors come from the heap arenas, whose freed pages a
    multi-threaded process (gloo, DCP, the data loader) rarely returns: measured on 4 gloo ranks training
    a 156M-parameter Llama under FSDP2, the peak host RSS per rank was 2.5-2.8 GiB with the default and 1.24
    GiB with a fixed 1 MiB threshold (live tensors: 0.6 GiB), for about 15% fewer CPU tokens/s. Returns
    whether it took effect (False off glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD; also stops its adaptation
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to set
        return False

