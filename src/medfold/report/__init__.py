"""One self-contained HTML page from the result files alone: no training, no model loading.

Two steps: :func:`gather` reads the result files into typed views (dataclasses of tables,
figures and values, below), and the Jinja2 templates in ``templates/`` lay them out. Jinja2 runs
with autoescaping on, so every string from a dataset (file names, class names, patient IDs,
config values) is escaped by default; only the figures this module draws (matplotlib SVG, PNG data
URLs) are marked safe. Figures are inline, styles are inline, and the page asks no other host for
anything, so it reads the same offline or mailed as one file.

The page opens with the comparison of experiments; each experiment's detail (a grid's
combinations included), the dataset's near-duplicates, the explanations and the job timings are
collapsible ``<details>`` blocks, and wide tables scroll inside the page.
"""

import matplotlib

matplotlib.use("Agg")  # before any part imports pyplot
