"""Training: the driver (``driver``: Ray, storage, tracking), the loop of one rank (``loop``)
over a ``RunContext`` (``context``: in-process; ``ray_context``: a Ray Train worker), its
state (``state``), policies (``policies``), in-training k-NN (``evaluation``) and console
(``progress``)."""
