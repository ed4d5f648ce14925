"""Placement search: which (layer, target) points get modules, under a parameter budget, before training.

The frozen backbone's gradients on each task decide where low-rank modules pay off. Five steps:

1. Blocks. Every adaptable linear W [out, in] of every layer is cut into blocks, each inside one
   (layer, target) point: rows of one query head in q_proj, rows of one key/value head in k_proj and v_proj
   (GQA: num_key_value_heads blocks), columns of one query head in o_proj, and groups of `block_width`
   intermediate neurons: rows of gate_proj and up_proj, columns of down_proj (the last group may be narrower).
   Heads and neuron groups are the units the layers compute with, so a block means the same thing in
   every task.

2. Sketches. For task t, `batches_per_task` batches go through the frozen model (eval mode, causal LM loss
   over shifted labels != -100). For block b with batch gradient g_btk (flattened) we keep
       s_bt = (1/K) sum_k S_b g_btk        (count sketch, [sketch_dim])
       e_bt = (1/K) sum_k ||g_btk||^2      (exact gradient energy)
   S_b sends element n to bucket h(n) = ((a n + c) mod p) mod sketch_dim with sign sigma(n) from the low
   bit of (a' n + c') mod p, p = 2^31 - 1, (a, c, a', c') drawn from the seed and the point. E||S x||^2 =
   ||x||^2 and E<S x, S y> = <x, y>. Hashes are computed on the fly in chunks inside a post-accumulate
   gradient hook that frees each weight's gradient at once: no [num_params, sketch_dim] matrix, and at most
   one weight gradient alive. Output: sketches [num_blocks, num_tasks, sketch_dim], energy
   [num_blocks, num_tasks].

3. Clusters. Raw sketches of two blocks live in unrelated coordinates (different weights, different
   hashes), so their cosine means nothing. We compare blocks by their task profile instead: the Gram matrix
   G_b = S_b S_b^T [num_tasks, num_tasks], which estimates <g_bt, g_bu> (how strongly each task pulls on the
   block and whether tasks agree or conflict there) independently of the block's coordinates. With
   f_b = vec(G_b) / ||vec(G_b)||, the similarity is cos(a, b) = <f_a, f_b> >= 0 (G's are PSD). Each block
   keeps its `knn` most similar blocks, W = max(W_knn, W_knn^T), L = I - D^-1/2 W D^-1/2. The rows of the
   C = num_clusters eigenvectors of L with the smallest eigenvalues, scaled to unit norm (Ng, Jordan and
   Weiss), are clustered by k-means (k-means++ seeding, best of `kmeans_restarts` seeded runs).
   `torch.linalg.eigh` on the dense L bounds this to MAX_SPECTRAL_BLOCKS (8192) blocks; Llama-3-8B with
   block_width 256 has 7,936 (minutes of CPU eigh at that size).

4. Gain. Target: the measured loss drop of a short probe, not a first-order formula (a predictor fitted to
   ||g||^2 * lr from features containing ||g||^2 would only restate its input). `probe_points` points,
   evenly spaced in the ranking by gradient energy, each get, per task, a fresh rank-r adapter
   (A ~ N(0, 1/in), B = 0) trained `probe_steps` full-batch Adam steps; y_p = sum_t (L_t - L_t^after).
   With energy shares q_bt = e_bt / sum_b' e_b't and q_b = sum_t q_bt, block features are
   f_b = [q_b1 .. q_bT, q_b * onehot(cluster_b), q_b * layer / (L - 1)]: a block without gradient has f_b = 0
   and predicts no gain (no adapter there changes the loss to first order), and cluster and depth scale
   the block's energy rather than add a constant. A point's prediction is w . F_p with
   F_p = (sum_{b in p} f_b) / sqrt(q_p), q_p = sum_{b in p} q_b: degree 1/2 in the energy, because Adam
   (probes and trainer) lowers the loss by about lr * ||g||_1 per early step, degree 1 in g. On a tiny
   Llama, probing all 14 points, this gave leave-one-out R^2 0.90 against 0.70 for the plain sum.
   w is the ridge least-squares fit
   of y on F over the probes (columns scaled to unit RMS, ridge * P * I added). Point score
   max(0, w . F_p): a trained module does not raise the training loss, so negative predictions are noise.
   The report carries the in-sample R^2 and the leave-one-out R^2; with fewer probes than features only the
   latter says anything about accuracy.

5. Selection. Point cost = rank * (in + out) * num_modules. Each point's cluster is the one holding most of
   its blocks' energy. Greedy: first the best gain/cost point of every cluster that fits (coverage; only
   points with gain > 0 count, so a cluster of blocks without gradient is not paid for), then points by
   gain/cost while they fit. Then 2-opt: repeatedly apply the best move among "add one", "swap
   one chosen for one unchosen", "swap one chosen for two unchosen" that stays in budget, keeps every
   covered cluster covered and strictly raises the total gain. Everything is seeded; ties go to the lowest
   index, so the placement is deterministic given the seed.
"""

from training.placement.blocks import Block, enumerate_blocks, point_costs, target_linear
from training.placement.config import Placement, PlacementConfig, Point
from training.placement.search import search_placement
from training.placement.select import Selection, greedy_select, random_select, select_points, two_opt
from training.placement.sketch import GradientSketch, count_sketch, sketch_gradients
from training.placement.spectral import kmeans, knn_graph, normalized_laplacian, spectral_clusters, task_profiles

__all__ = [
    "Block", "GradientSketch", "Placement", "PlacementConfig", "Point", "Selection", "count_sketch",
    "enumerate_blocks", "greedy_select", "kmeans", "knn_graph", "normalized_laplacian", "point_costs", "random_select",
    "search_placement", "select_points", "sketch_gradients", "spectral_clusters", "target_linear",
    "task_profiles", "two_opt",
]
