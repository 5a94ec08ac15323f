"""Experiments around the library: multiscale data sets and loaders, test problems, the paper's figures and
the walkthrough. ``import mrgd_ext`` never imports this package; import its modules explicitly
(``from mrgd_ext.experiments import data``)."""
