"""One optimiser step, the same in every parallel mode: fetch, global counts, micro-batch losses, backward,
clip and step.

The loss rule (torchtitan's, TRL's): every (stream, objective) is normalised by its loss-bearing tokens over
ALL micro-batches of the step and ALL ranks, counted once before any forward; each micro-batch's loss sums
are divided by those global counts, weighted, and back-propagated, so gradient accumulation and data
parallelism are exact and gradients are summed over ranks. A stream expecting fewer than one micro-batch
per step also carries `Mixture.presence`'s factor, which keeps its configured weight on average.

Everything a parallel mode does differently sits behind `distill.parallel.base.Strategy`; everything a stream
does differently (its objectives, layers, positions and teacher) sits in its `StreamObjectives`, built once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable

import torch

from distill.config import ConfigError, RecipeConfig, StreamConfig
from distill.data.dataset import DataError, PackedStream
from distill.data.mixture import Mixture, stable_seed
from distill.model.attention import document_offsets, flattens
from distill.model.decoder import TruncatedTeacher
from distill.model.expansion import take_pairs
from distill.model.objectives import alignment_loss, hidden_cosine_loss, kl_loss, lm_loss
from distill.model.rope import skipped_positions
from distill.parallel.memory import FinalState, long_streams, scope
from distill.train.spans import NO_SPANS, Spans

logger = logging.getLogger(__name__)


class BadRowError(DataError):
    """A row of built data holds a token id outside the vocabulary (one line: stream, row, file)."""


# ---------------------------------------------------------------------------------------------------
# one stream
# ---------------------------------------------------------------------------------------------------
def check_stream(name: str, stream_cfg: StreamConfig, data: PackedStream, window: int,
                 target_length: int) -> None:
    """A stream's recipe against its built data; one-line ConfigError.

    Short-to-long streams (positions cream / uniform) need one document per row (the `window` packer), rows
    no longer than the teacher's native window, and a target length beyond that window, since the student
    sees the row at skipped positions reaching the target while the teacher reads it at 0..T-1.
    """
    if stream_cfg.seq_len is not None and stream_cfg.seq_len != data.seq_len:
        raise ConfigError(f"streams.{name}.seq_len: {stream_cfg.seq_len}, but {data.path} was built with "
                          f"rows of {data.seq_len}")
    if data.seq_len > target_length:
        raise ConfigError(f"streams.{name}.data: rows of {data.seq_len} tokens exceed rope.target_length "
                          f"{target_length}")
    if stream_cfg.positions == "native":
        return
    key = f"streams.{name}"
    pack = data.info.get("pack")
    if pack != "window":
        raise ConfigError(f"{key}.positions: {stream_cfg.positions} needs rows of one document each, built "
                          f"with pack: window; {data.path} was built with pack: {pack}")
    if data.seq_len > window:
        raise ConfigError(f"{key}.data: rows of {data.seq_len} tokens exceed the teacher's window {window}; "
                          f"positions: {stream_cfg.positions} distils text of at most the original length "
                          f"(allowed: seq_len ≤ {window})")
    if target_length <= window:
        raise ConfigError(f"{key}.positions: {stream_cfg.positions} spreads rows over rope.target_length "
                          f"{target_length}, which must exceed the teacher's window {window}")


@dataclasses.dataclass
class StreamObjectives:
    """One stream's loss state, built once: what it trains on and how.

    Attributes:
        name: the stream's name in the recipe.
        cfg: its StreamConfig (objectives, positions).
        data: the built rows.
        layers: hidden-state indices for `hidden` (0 = embeddings, num_layers = the final-norm output).
        num_layers: the student's decoder layers.
        target_length: rope.target_length (skipped positions reach it).
        teacher: the truncated teacher runner, None for a stream without teacher objectives.
        teacher_head: the teacher's lm_head weight (for `kl`), else None.
        sequence: the sequence-parallel groups when this stream's rows are split over S ranks, else None.
        alignment: model.expansion.alignment when the student is expanded with a non-zero alignment weight
            (the objective `alignment` of every stream), else None.
        flatten: run packed micro-batches as ONE row of B·T tokens with their document offsets
            (`distill.model.attention.flattens`: flash_attention_2), else as B rows.
    """

    name: str
    cfg: StreamConfig
    data: PackedStream
    layers: list[int]
    num_layers: int
    target_length: int
    teacher: Callable | None = None
    teacher_head: torch.Tensor | None = None
    sequence: object = None
    alignment: object = None
    flatten: bool = True
    savers: tuple[bool, int] | None = None
    """`distill.parallel.memory.scope`'s (offload, MLP chunks) on the long stream when the recipe turns them
    on."""

    @property
    def objectives(self) -> list[str]:
        return list(self.cfg.objectives.active()) + (["alignment"] if self.alignment is not None else [])

    def weight(self, objective: str) -> float:
        if objective == "alignment":
            return self.alignment.weight
        return self.cfg.objectives.active()[objective].weight

    def fetch(self, rows: list[int], device, vocab_size: int, part: int = 0) -> tuple[dict, list[str]]:
        """The micro-batch's tensors on `device` ({"input_ids", "position_ids", "labels"} (B, T) int64,
        "real" (B, T) bool) and one line per row with a token id outside [0, vocab_size); such a row is
        blanked (no loss, no real tokens) so the step can skip it.

        Split along the sequence (`sequence`, the stream's rows over S ranks): the rows flattened to one and
        this rank's slice `part` of it, (1, B·T/S) each, with "targets" (the labels already shifted: the
        target of a slice's last token is the next slice's first) instead of "labels".

        Flattened (`flatten` or split): also "offsets", the whole flattened row's document offsets
        (`distill.model.attention.document_offsets`, computed here on the host once per micro-batch).
        """
        batch = {k: v for k, v in self.data.batch(rows).items() if torch.is_tensor(v)}
        bad, mask = self.data.bad_rows(rows, batch["input_ids"], vocab_size)
        batch["real"] = self.data.real_mask(rows)
        if bad:
            _blank_bad_rows(batch, mask)
        flattened = self.flatten or self.sequence is not None
        offsets = document_offsets(batch["position_ids"]) if flattened else None
        if self.sequence is not None:
            targets = torch.full_like(batch["labels"], -100)  # (B, T)
            targets[:, :-1] = batch["labels"][:, 1:]
            flat = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                    "targets": targets, "real": batch["real"]}
            batch = {k: self.sequence.piece(v.reshape(1, -1)) for k, v in flat.items()}
        batch = {k: v.to(device) for k, v in batch.items()}
        if offsets is not None:
            batch["offsets"] = {k: v.to(device) if torch.is_tensor(v) else v for k, v in offsets.items()}
        return batch, bad

    def counts(self, batch: dict) -> dict[str, int]:
        """Loss-bearing tokens per objective (the normaliser), known before any forward."""
        counts = {}
        if self.cfg.objectives.lm is not None:
            counts["lm"] = int((batch["targets"] != -100).sum()) if "targets" in batch else \
                int((batch["labels"][:, 1:] != -100).sum())
        for name in ("hidden", "kl"):
            if getattr(self.cfg.objectives, name) is not None:
                counts[name] = int(batch["real"].sum())
        if self.alignment is not None:
            counts["alignment"] = int(batch["real"].sum())
        return counts

    def model_inputs(self, batch: dict, positions_seed: int) -> tuple[dict, dict]:
        """The exact inputs of the student's and the teacher's forwards for a micro-batch.

        Packed rows (several documents each, positions restarting at 0 per document) go in with
        `attention_mask` None, which every backend reads as "separate the documents by their positions". For
        flash_attention_2 (`flatten`) they are flattened into ONE row of B·T tokens, as transformers'
        DataCollatorWithFlattening does, with the documents' offsets (`cu_seq_lens_q/k`, `max_length_q/k`:
        transformers' FlashAttentionKwargs, so no layer derives them again): flash reads packed documents only
        when the batch has one row (with B > 1 its documents attended to each other). Other backends keep B
        rows (transformers' sdpa builds B masks of T², not one of (B·T)²). A short-to-long row is one document
        seen at skipped positions: it stays a row of its own, with an explicit all-ones mask, so the position
        jumps are not read as document boundaries. The teacher reads every row at its native positions, laid
        out as packed rows are.

        Returns:
            (student inputs, teacher inputs): {"input_ids", "position_ids", "attention_mask"} and, flattened,
            the offsets; shapes (1, B·T) when flattened, else (B, T).
        """
        input_ids, positions = batch["input_ids"], batch["position_ids"]  # (B, T) each, (1, n) when split
        B, T = input_ids.shape
        if "offsets" in batch:
            flat = {"input_ids": input_ids.reshape(1, B * T), "position_ids": positions.reshape(1, B * T),
                    "attention_mask": None, **batch["offsets"]}
        else:
            flat = {"input_ids": input_ids, "position_ids": positions, "attention_mask": None}
        if self.cfg.positions == "native":
            return flat, flat
        gen = torch.Generator().manual_seed(positions_seed)
        skipped = torch.stack([skipped_positions(T, self.target_length, self.cfg.positions, gen)
                               for _ in range(B)]).to(input_ids.device)  # (B, T)
        one_document = torch.ones_like(input_ids)  # an explicit mask: the jumps are not document boundaries
        return {"input_ids": input_ids, "position_ids": skipped, "attention_mask": one_document}, flat

    @contextlib.contextmanager
    def split_attention(self):
        """The context in which this stream's forwards and backwards run: its attention split over its
        sequence-parallel group when the stream is split (the backward recomputes checkpointed layers, whose
        attention must split again), and the memory savers on the long stream (`distill.parallel.memory`)."""
        with contextlib.ExitStack() as stack:
            if self.sequence is not None:
                stack.enter_context(self.sequence.on(self.name))
            if self.savers is not None:
                stack.enter_context(scope(*self.savers))
            yield

    def losses(self, strategy, batch: dict, positions_seed: int, autocast, spans: Spans = NO_SPANS) -> dict:
        """Loss sums of every objective of one micro-batch: {objective: 0-dim tensor}."""
        real = batch["real"]  # (B, T)
        B, T = real.shape
        objectives = self.cfg.objectives
        student_inputs, teacher_inputs = self.model_inputs(batch, positions_seed)

        # One autocast region for the forwards and the objectives: the chunked losses' two large matmuls take
        # the compute dtype (as the model's own lm_head would) while their reductions stay fp32 (the hidden
        # cosine upcasts itself). The final hidden state is fp32 under CPU autocast (the residual stream is):
        # outside autocast those matmuls ran in fp32, 3x slower on a bf16 CPU.
        with autocast():
            # Every layer's state only when a loss compares them (else only the final one is kept alive).
            every = bool(self.layers)
            final = contextlib.nullcontext() if every else FinalState(strategy.student)
            with spans("student_forward", self.name), self.split_attention(), final:
                # Through the root (sharded modes gather embeddings and lm_head there); logits for one token.
                out = strategy.forward(**student_inputs, output_hidden_states=every, use_cache=False,
                                       logits_to_keep=1)
            states = [h.view(B, T, -1) for h in out.hidden_states] if every else \
                [final.value.view(B, T, -1)]  # n_layers + 1 (or the last) of (B, T, H); [-1] normed
            del out, final
            head = strategy.output_weight()
            sums = {}
            if self.alignment is not None:
                with spans("loss", self.name):
                    sums["alignment"] = alignment_loss(take_pairs(strategy.student), real,
                                                       self.alignment.kind)[0]
            if objectives.lm is not None:
                with spans("loss", self.name):
                    lm, shifted = objectives.lm, "targets" in batch
                    sums["lm"] = lm_loss(states[-1], head, batch["targets"] if shifted else batch["labels"],
                                         chunk_size=lm.chunk_size, use_liger=lm.fused, shifted=shifted)[0]
            if self.teacher is not None:
                final = {self.num_layers} if objectives.kl is not None else set()
                wanted = sorted(set(self.layers) | final)
                with spans("teacher_forward", self.name):
                    extra = {k: v for k, v in teacher_inputs.items()
                             if k not in ("input_ids", "position_ids", "attention_mask")}
                    taught = {i: h.view(B, T, -1) for i, h in self.teacher(
                        teacher_inputs["input_ids"], teacher_inputs["position_ids"], None, wanted,
                        objectives.kl is not None, **extra).items()}
                with spans("loss", self.name):
                    if objectives.hidden is not None:
                        sums["hidden"] = hidden_cosine_loss([states[i] for i in self.layers],
                                                            [taught[i] for i in self.layers], real)[0]
                    if objectives.kl is not None:
                        kl = objectives.kl
                        sums["kl"] = kl_loss(states[-1], head, taught[self.num_layers], self.teacher_head,
                                             real, kind=kl.kind, temperature=kl.temperature,
                                             chunk_size=kl.chunk_size)[0]
                del taught  # nothing of the teacher outlives its loss
        return sums


def build_objectives(cfg: RecipeConfig, streams: dict[str, PackedStream], layers: dict[str, list[int]],
                     num_layers: int, teacher=None, strategy=None,
                     attention: str = "sdpa_varlen", savers: tuple[bool, int] | None = None
                     ) -> dict[str, StreamObjectives]:
    """Every stream's StreamObjectives (after the strategy's set-up: `teacher` is the sharded one if any, and
    the streams in `strategy.split` get its sequence-parallel groups; with an expanded student and an
    alignment weight, every stream gets the objective `alignment`).

    Args:
        attention: the models' attention implementation (before any sequence-parallel wrapper): whether
            micro-batches are flattened (`distill.model.attention.flattens`).
        savers: `distill.parallel.memory.install_savers`'s (offload, MLP chunks) for the streams with the
        longest rows,
            or None.
    """
    longest = long_streams({n: s.seq_len for n, s in streams.items()}) if savers is not None else set()

    runner = TruncatedTeacher(teacher) if teacher is not None else None  # shared: one copy per depth
    expansion = cfg.model.expansion
    alignment = expansion.alignment if expansion is not None and expansion.alignment is not None and \
        expansion.alignment.weight > 0 else None
    built = {}
    for name, stream_cfg in cfg.streams.items():
        taught = teacher is not None and stream_cfg.objectives.needs_teacher
        head = teacher.get_output_embeddings().weight if taught and stream_cfg.objectives.kl else None
        built[name] = StreamObjectives(
            name=name, cfg=stream_cfg, data=streams[name], layers=layers.get(name, []), num_layers=num_layers,
            target_length=cfg.rope.target_length, teacher=runner if taught else None, teacher_head=head,
            sequence=strategy.sequence if strategy is not None and name in strategy.split else None,
            alignment=alignment, flatten=flattens(attention), savers=savers if name in longest else None)
    return built


# ---------------------------------------------------------------------------------------------------
# one step
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StepContext:
    """What every step of a run shares (built once in distill.train.loop.run)."""

    strategy: object
    streams: dict[str, StreamObjectives]
    mixture: Mixture
    device: torch.device
    autocast: Callable
    seed: int
    max_grad_norm: float
    vocab_size: int
    bad_rows: str = "stop"
    spans: Spans = NO_SPANS
    layer_grad_every: int = 0
    """log.layer_grad_every."""
    grad_groups: dict | None = None
    """The student's trainable parameters by part (`distill.optim.localise.grad_groups`) when
    layer_grad_every."""

    def __post_init__(self):
        self.keys = [(n, o) for n, s in self.streams.items() for o in s.objectives]  # (stream, objective)
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.weights = torch.tensor([self.streams[n].weight(o) for n, o in self.keys], dtype=torch.float64)
        self.cost = {n: s.data.seq_len for n, s in self.streams.items()}


@dataclasses.dataclass
class StepResult:
    loss: float
    """Σ weight · presence · per-token mean over the (stream, objective)s of the step."""
    grad_norm: float
    means: dict[tuple[str, str], float]
    """Per-token mean of each (stream, objective) present in the step."""
    slots: dict[str, int]
    """Token slots per stream over the whole step (all ranks)."""
    stepped: bool
    """False when the loss or the gradient norm was not finite and the step was skipped."""
    skipped_rows: int = 0
    """Rows skipped for out-of-vocabulary token ids (train.bad_rows: skip), over all ranks."""
    part_norms: dict[str, float] = dataclasses.field(default_factory=dict)
    """On a log.layer_grad_every step: the gradient norm of each part (`distill.optim.localise.grad_groups`)
    before
    clipping, of the step ("layers.0.attn") and of each stream ("short/layers.0.attn"); else empty."""

    @property
    def tokens(self) -> int:
        return sum(self.slots.values())


def train_step(ctx: StepContext, step: int) -> StepResult:
    """Run optimiser step `step` (0-based) of the plan; every rank calls it with the same step."""
    strategy, spans, keys = ctx.strategy, ctx.spans, ctx.keys
    cursors = ctx.mixture.state_dict()
    plan = ctx.mixture.plan(step)
    slots = strategy.assign(plan, ctx.cost)

    # Fetch every micro-batch of the step first, then count loss-bearing tokens over all of them and all
    # ranks once: every micro-batch's sums are divided by these global counts (exact accumulation).
    fetched, problems = [], []
    local = torch.zeros(len(keys) + 1, dtype=torch.float64)  # counts per key, then bad rows
    for slot in slots:
        stream = ctx.streams[slot.stream]
        with spans("data", slot.stream):
            batch, bad = stream.fetch(slot.fetch.rows, ctx.device, ctx.vocab_size, slot.part)
        if bad and not slot.is_dummy and slot.part == 0:  # a split micro-batch reports once, from part 0
            problems += [f"streams.{slot.stream}: {line}" for line in bad]
            local[-1] += len(bad)
        if not slot.is_dummy:
            for obj, n in stream.counts(batch).items():
                local[ctx.index[(slot.stream, obj)]] += n
        fetched.append((slot, batch))
    global_counts = strategy.procs.all_reduce(local.to(ctx.device)).cpu()
    bad_rows, global_counts = int(global_counts[-1]), global_counts[:-1]
    found = [line for lines in strategy.procs.gather_objects(problems) for line in lines] if bad_rows else []
    if found and ctx.bad_rows == "skip":
        for line in found:
            logger.warning("step %d: skipped %s", step + 1, line)
    if found and ctx.bad_rows == "stop":
        ctx.mixture.load_state_dict(cursors)  # the step did not happen: a resume replays it
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise BadRowError(f"{found[0]}{more}; rebuild the stream (scripts/prepare_data.py --verify finds "
                          f"damaged files) or set train.bad_rows: skip")

    presence = ctx.mixture.presence(step)
    loss_sums = torch.zeros(len(keys), dtype=torch.float64, device=ctx.device)  # on device: no sync per batch
    # log.layer_grad_every: this step's per-part gradient norms, of the step and of each stream. Per stream,
    # the micro-batches run grouped by stream (the same order on every rank: aligned plans stay aligned), each
    # group's gradients reduced on their own while the earlier groups' sum waits aside, then added back.
    every = ctx.layer_grad_every
    traced = ctx.grad_groups is not None and every > 0 and (step + 1) % every == 0
    per_stream = traced and strategy.can_stash
    if per_stream:
        order = {n: i for i, n in enumerate(ctx.streams)}
        fetched.sort(key=lambda item: order[item[0].stream])  # stable: split micro-batches stay in order
        groups = [(n, [item for item in fetched if item[0].stream == n]) for n in ctx.streams]
    else:
        groups = [(None, fetched)]
    part_norms, stash = {}, None
    for name, group in groups:
        if per_stream:
            stash = strategy.stash_gradients(stash)
        for i, (slot, batch) in enumerate(group):
            stream = ctx.streams[slot.stream]
            seed = stable_seed(ctx.seed, "positions", step, slot.fetch.index) % (2**63)
            sums = stream.losses(strategy, batch, seed, ctx.autocast, spans)
            loss = 0.0
            scale = 0.0 if slot.is_dummy else presence[slot.stream]  # a dummy only keeps collectives in step
            for obj, value in sums.items():
                k = ctx.index[(slot.stream, obj)]
                loss = loss + scale * ctx.weights[k].item() * value / max(global_counts[k].item(), 1.0)
                if not slot.is_dummy:
                    loss_sums[k] += value.detach().double()
            with spans("backward", slot.stream), stream.split_attention():
                strategy.backward(loss, last=i == len(group) - 1)
            del sums, loss
        if per_stream:  # every rank, even one without this stream's micro-batches: collectives line up
            strategy.reduce_gradients()
            part_norms.update({f"{name}/{k}": v for k, v in strategy.grad_norms(ctx.grad_groups).items()})
    with spans("clip_grad"):
        if per_stream:
            strategy.restore_gradients(stash)  # already summed over ranks, group by group
        else:
            strategy.reduce_gradients()
        if traced:
            part_norms.update(strategy.grad_norms(ctx.grad_groups))
        grad_norm = strategy.clip(ctx.max_grad_norm)
    loss_sums = strategy.procs.all_reduce(loss_sums).cpu()
    means = loss_sums / global_counts.clamp(min=1)
    factors = torch.tensor([presence[n] for n, _ in keys], dtype=torch.float64)
    present = global_counts > 0
    total = float((ctx.weights * factors * means)[present].sum())

    stepped = math.isfinite(total) and math.isfinite(grad_norm)
    with spans("optimizer"):
        strategy.step() if stepped else strategy.skip_step()
        strategy.zero_grad()
    slot_tokens: dict[str, int] = {}  # token slots of the whole step (all ranks) per stream
    for mb in plan:
        slot_tokens[mb.stream] = slot_tokens.get(mb.stream, 0) + len(mb.rows) * ctx.cost[mb.stream]
    return StepResult(loss=total, grad_norm=grad_norm,
                      means={k: m for k, m, c in zip(keys, means.tolist(), global_counts.tolist()) if c > 0},
                      slots=slot_tokens, stepped=stepped, skipped_rows=bad_rows, part_norms=part_norms)


def _blank_bad_rows(batch: dict, rows: torch.Tensor) -> None:
    """train.bad_rows: skip — a bad row keeps its place (every rank's forwards stay aligned) but carries no
    loss: ids set to 0, labels ignored, no real tokens. `rows`: (B,) bool."""
    ids = batch["input_ids"]
    ids[rows] = 0
    batch["labels"][rows] = -100
    batch["real"][rows] = False
