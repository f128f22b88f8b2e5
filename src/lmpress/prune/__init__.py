"""Pruning: set weights of linear layers to exactly zero, unstructured or in N:M patterns.

    masks.py      the patterns: which weights to keep, given a score per weight (validation of "2:4" etc.)
    magnitude.py  |W| scores, data-free: the baseline (a per-layer function for compress's CONVERT table)
    wanda.py      |W_ij|·‖X_j‖₂ scores (Sun, Liu, Bair & Kolter, 2023), calibrated, no weight update
    sparsegpt.py  OBS pruning with weight reconstruction (Frantar & Alistarh, 2023), optionally quantizing the
                  kept weights jointly (GPTQ's grid), calibrated

Conventions shared by all three. Weights are [O, I] (output rows, input columns). A mask is a bool tensor
[O, I], True = kept. `sparsity` is the fraction of weights set to zero, in [0, 1); `pattern` is None
(unstructured) or "N:M": in every M consecutive input columns of a row, N weights are kept (2:4 keeps 2 of
4, i.e. 50%) and the others are zero; with a pattern, `sparsity` is ignored. Counts are exact:

- per output row (magnitude, Wanda unstructured): every row prunes exactly floor(sparsity · I) weights;
- per layer (SparseGPT unstructured, whose mask adapts across rows): exactly floor(sparsity · O · I);
- N:M: exactly N kept in every full group of M columns; when M does not divide I, the last r < M columns
  keep min(r, N) — the group counts as padded with zero columns, so it still has at most N non-zeros of M.

Ties between equal scores prune the lower column index first (stable sorts): the masks are deterministic.
Pruned layers stay dense (nn.Linear with zeros, or PackedLinear with the zero code for SparseGPT + bits);
a sparse storage format is separate work.
"""
