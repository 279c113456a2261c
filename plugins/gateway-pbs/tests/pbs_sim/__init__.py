"""A small OpenPBS simulator for the tests: ``qsub``, ``qstat``, ``qdel`` and ``qrls`` over a
state directory, running each job as a local process of the user who submitted it.

`install` writes the command scripts (``bin/``) and the server's state directory; `server`
keeps the job records (one JSON file per job, under a file lock); `commands` implements the
commands and the per-job runner that qsub forks. Standard library only, so the scripts run
with the system Python as any user.
"""
