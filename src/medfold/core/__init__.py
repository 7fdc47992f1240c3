"""The small core every stage shares: errors, atomic files and outputs, seeds, progress, the host's
CPU, pseudonyms for shared outputs, and the boundary between a Snakemake rule and the library (step)."""
