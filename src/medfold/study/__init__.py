"""A run's whole configuration: a config resolved and cross-checked into one Study before any job
runs (resolve), or planned from the data (plan); the top of the import graph, since both reach
into the data and training stages."""
