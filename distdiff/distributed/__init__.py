"""The distributed layer. Only :mod:`distdiff.distributed.actors`, :mod:`distdiff.distributed.driver`
and :mod:`distdiff.distributed.tuning` import Ray; the classes they make into actors are plain."""
