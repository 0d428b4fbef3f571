"""The composition root: a typed :class:`~catforge.config.Config` in, the objects a mode needs out.

Every reading of the config for building happens in this package; the packages below take plain
values and objects. :mod:`.models` builds models, label transforms and potentials from
checkpoints; :mod:`.data` opens datasets and loaders; :mod:`.training` builds a training run in
the order that fails fastest: model, optimizer, schedule, loss and logger are built or checked
before any dataset is opened.
"""
