"""One process, or data parallel with the student and the teacher replicated on every rank (DDP-like).

Each rank runs its part of the step's plan (`distill.data.mixture.shard`, balanced by token cost; no alignment
needed, as forwards issue no collectives), back-propagates locally, and the gradients are summed over ranks
once per step in flat buckets (`reduce_gradients`). Exact: the losses are divided by global token counts.
"""

from __future__ import annotations

import torch

from distill.optim.optimizer import keep_kernel, make_optimizer
from distill.parallel.base import Strategy


class Replicated(Strategy):
    name = "replicated"

    def setup(self, student, teacher, optim_cfg, dtype) -> None:
        del dtype  # autocast does mixed precision over the fp32 master weights
        student.to(self.procs.device)  # a no-op when loaded there; the whole model lives on every rank
        if teacher is not None:
            teacher.to(self.procs.device)
        self.student, self.teacher = student, teacher
        self.optimizer = make_optimizer(student, optim_cfg, sharded=False,
                                        lr_scales=self.param_scales(student))
        self.params = [p for p in student.parameters() if p.requires_grad]

    def describe(self) -> str:
        if self.procs.world == 1:
            return "one process"
        return f"data parallel over {self.procs.world} processes: student and teacher replicated"

    def reduce_gradients(self, bucket_numel: int = 2**24) -> None:
        if self.procs.world == 1:
            return
        # A parameter no loss reached on ANY rank keeps no gradient (AdamW skips it, as on one process); one
        # reached on some ranks takes part in the sum with zeros from the others.
        reached = torch.tensor([p.grad is not None for p in self.params], dtype=torch.float32,
                               device=self.procs.device)
        reached = self.procs.all_reduce(reached, op="max").bool().tolist()
        grads = []
        for p, used in zip(self.params, reached):
            if not used:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        start = 0
        while start < len(grads):
            end, numel = start, 0
            while end < len(grads) and (numel == 0 or numel + grads[end].numel() <= bucket_numel):
                numel += grads[end].numel()
                end += 1
            flat = torch.cat([g.reshape(-1) for g in grads[start:end]])
            self.procs.all_reduce(flat)
            offset = 0
            for g in grads[start:end]:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()
            start = end

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        if not self.procs.is_main:
            return {}
        return {k: v.detach() for k, v in self.student.state_dict().items()}

    def optimizer_state_dict(self) -> dict:
        return self.optimizer.state_dict() if self.procs.is_main else {}

    def load_optimizer_state(self, read) -> None:
        self.optimizer.load_state_dict(read())
        keep_kernel(self.optimizer)
