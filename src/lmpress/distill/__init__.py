"""Knowledge distillation: a student learns a teacher's output distribution (and optionally hidden states).

    losses.py   KL on temperature-softened logits (full or the teacher's cached top-k), hidden-state MSE with a
                learned projection, next-token cross-entropy; one weighted sum
    student.py  students made from the teacher: blocks dropped (by influence or evenly), the layer map between
                the two, the projection for different widths
    train.py    the training loop: AdamW/SGD, warm-up + cosine, gradient accumulation and checkpointing, bf16
                autocast on CUDA, teacher top-k cache (safetensors), checkpoints and exact resume, masks kept
                on sparse layers (fixed or gradual), progress with loss and held-out perplexity
"""
