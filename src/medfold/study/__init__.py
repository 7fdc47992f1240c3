"""A run's whole configuration: a config resolved and cross-checked into one Study before any job runs
(resolve); the top of the import graph, since its checks reach into the data and training stages."""
