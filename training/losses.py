"""The training objective: task loss plus four regularisers, each a small function with its formula.

    total = task + lambda_decouple * decouple + lambda_align * align + lambda_sparse * sparse
            + lambda_prior * prior
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.data import IGNORE


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal LM cross-entropy on assistant tokens only.

        task = mean over positions i with labels[i + 1] != IGNORE of  -log p(labels[i + 1] | tokens <= i)

    logits [batch, seq, vocab], labels [batch, seq] (IGNORE outside assistant turns).
    """
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [batch * (seq - 1), vocab]
    targets = labels[:, 1:].reshape(-1)  # [batch * (seq - 1)]
    if not (targets != IGNORE).any():
        raise ValueError("task_loss: the batch has no assistant token to learn")
    return F.cross_entropy(shifted, targets, ignore_index=IGNORE)


def decoupling_loss(u: torch.Tensor, b: torch.Tensor, col_module: torch.Tensor, num_modules: int,
                    eps: float = 1e-12) -> torch.Tensor:
    """Squared cosines between the modules' outputs at one insertion point, summed over pairs.

        o_j = u_j B_j^T                       module j's output on the batch's tokens, [tokens, out]
        c_ij = <o_i, o_j> / (|o_i| |o_j|)     (Frobenius inner product over tokens and features)
        decouple = sum_{i < j} c_ij^2

    Computed without materialising o_j: <o_i, o_j> = sum((u_i^T u_j) * (B_i^T B_j)), so with
    C = u^T u and D = B^T B over the stacked rank columns [R, R] and S the one-hot column -> module
    matrix [R, N], the inner products are S^T (C * D) S. A module absent from the point, or with a zero
    output (B = 0 at init), has c_ij = 0. The alpha / r scales cancel in the cosine.

    u [tokens, R] (x A^T over the stacked ranks), b [out, R], col_module [R] (module of each column).
    """
    select = F.one_hot(col_module, num_modules).to(u.dtype)  # [R, N]
    inner = select.t() @ ((u.t() @ u) * (b.t() @ b)) @ select  # [N, N]
    squared = inner.diagonal().clamp_min(0)  # [N], |o_j|^2
    cosine = inner / (squared[:, None] * squared[None, :] + eps).sqrt()  # [N, N]; eps keeps B = 0 differentiable
    return torch.triu(cosine, diagonal=1).square().sum()


def alignment_loss(target_logits: torch.Tensor, module_logits: torch.Tensor) -> torch.Tensor:
    """KL(target || module alone), mean over assistant positions.

        align = mean_i sum_v p_c(v | i) (log p_c(v | i) - log p_j(v | i))

    p_c: the composed model's next-token distribution (the training forward, detached: it is the
    target, not trained towards the module). p_j: the same rows with only module j active at gate 1.
    Minimising it makes each module a usable model of the task on its own, so a composition does not
    depend on modules cancelling each other. Cost is bounded by using one sampled module per step.
    target_logits and module_logits: [positions, vocab] at assistant positions.
    """
    target = F.log_softmax(target_logits.detach().float(), dim=-1)  # [positions, vocab]
    module = F.log_softmax(module_logits.float(), dim=-1)  # [positions, vocab]
    return F.kl_div(module, target, log_target=True, reduction="batchmean")


def sparsity_loss(insertion_gates: torch.Tensor) -> torch.Tensor:
    """Mean insertion gate (an L1 norm, since gates are positive, divided by the point count).

        sparse = (1 / P) sum_p sigmoid(l_p)

    insertion_gates [P] in (0, 1). Dividing by P keeps lambda_sparse meaningful across placements.
    """
    return insertion_gates.mean()


def prior_loss(gates: torch.Tensor, relation: torch.Tensor) -> torch.Tensor:
    """Task-relation prior: related tasks get similar gate vectors.

        prior = sum_{t, u} R[t, u] * ||a_t - a_u||^2

    gates [num_tasks, N] (a_t = sigmoid(logits_t / T)), relation R [num_tasks, num_tasks], >= 0 with a
    zero diagonal (training.relation estimates it from gradient similarity when it is not given).
    """
    distances = (gates[:, None, :] - gates[None, :, :]).square().sum(-1)  # [num_tasks, num_tasks]
    return (relation * distances).sum()
