"""Index a dataset into one validated table: image, patient, labels, size, content hash.

Three adapters read what users have (a folder-per-class tree, a CSV such as NIH's
``Data_Entry_2017.csv``, a MedMNIST ``.npz``) into the same candidate table; the rest
(patient IDs, label checks, decoding every image, duplicates) is shared. A bad image never
aborts indexing: it is listed in the report with its reason and left out of the table.
"""
