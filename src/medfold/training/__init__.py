"""Stage 3, training: one model per fold (fold, train), its epoch loop (loop), models, transforms,
DDP/Horovod (distributed), MLflow tracking, and what trains inside the loop (fake quantisation, pruning)."""
