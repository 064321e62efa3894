"""The distributed layer: the only package that imports Ray. The classes made into actors
(:mod:`~distdiff.distributed.worker`, :mod:`~distdiff.distributed.replay`,
:mod:`~distdiff.distributed.learner`) and what they return (:mod:`~distdiff.distributed.messages`)
are plain; :mod:`~distdiff.distributed.actors` makes them actors."""
