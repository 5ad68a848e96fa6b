"""vaelab-report's rooms: the runs read back (runs.py), their tables (tables.py), figures (figures.py) and page
(page.py), and the whole report (report.py). Plain files in, plain files out: nothing here knows Hydra."""
