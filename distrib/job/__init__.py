"""The long job: what keeps a training run going for days, around the step.

``run`` (:class:`distrib.Run`: resume, checkpoints, preemption, elastic recovery, evaluation,
metrics around the loop), ``preemption`` (SIGUSR2/SIGTERM -> checkpoint -> requeue),
``user_state`` (the script's own state in checkpoints and elastic commits), ``schedule`` (the
learning rate across steps and world sizes). The checkpoints themselves are
:mod:`distrib.checkpoint`; the elastic recovery loop is :mod:`distrib.elastic`, kept at the top
level because scripts import it by that name (``@distrib.elastic.run``).
"""
