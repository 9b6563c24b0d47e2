"""The sweep: the paper's experiment over the number of layers removed, each criterion and each healing.

:mod:`.run` runs one (``run_sweep``) from the settings of :mod:`.settings`, over the points of :mod:`.plan`,
each run by :mod:`.point` through an executor (:mod:`.executors`), into ``results.sqlite`` (:mod:`.store`).
"""
