"""Running on a Ray cluster from outside it: job submission (``jobs``) and the policy of what
environment a job or worker gets (``env``, a leaf)."""
