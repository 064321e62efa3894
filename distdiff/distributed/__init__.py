"""The distributed layer. Only :mod:`distdiff.distributed.actors` and
:mod:`distdiff.distributed.driver` import Ray; the classes they make into actors are plain."""
