"""Stage 5, compression: a trained fold model made smaller (pruned, quantised to int8, fine-tuned) and
measured against the model it came from."""
