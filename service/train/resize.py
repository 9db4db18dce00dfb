"""Saving before Ray resizes an elastic group.

Ray Train resizes a running group by tearing it down and starting one of the new size, which
resumes from the newest checkpoint: every step since would be done twice. This controller
callback runs in Ray Train's controller just before such a resize: it asks the workers (a
request id in Ray's internal KV, read by rank 0 at its next look; ``service.train.stopping``)
to checkpoint the current step and hold, and lets the resize go on once rank 0 answers, or
after ``timeout_s``.
"""

from __future__ import annotations

import logging
import time
import uuid

from service.train.ray_compat import (
    RESIZING_STATE,
    RUNNING_STATE,
    SCHEDULING_STATE,
    controller_callback,
    kv_get,
    kv_put,
)
from service.train.stopping import RESIZE_KEY, SAVED_KEY

log = logging.getLogger(__name__)


class SaveBeforeResize(controller_callback()):  # type: ignore[misc]
    def __init__(self, run_name: str, timeout_s: float) -> None:
        self.run_name, self.timeout_s = run_name, timeout_s
        self.running_resize = False

    def after_controller_state_update(self, previous_state, current_state) -> None:
        # Running -> Resizing is a resize of a live group; Scheduling also follows a restart
        self.running_resize = (type(previous_state).__name__ == RUNNING_STATE
                               and type(current_state).__name__ == RESIZING_STATE) or (
            self.running_resize and type(current_state).__name__ == SCHEDULING_STATE)

    def before_controller_execute_resize_decision(self, resize_decision) -> None:
        if not self.running_resize:
            return
        self.running_resize = False
        request = uuid.uuid4().hex.encode()
        kv_put(RESIZE_KEY.format(run=self.run_name), request)
        started = time.time()
        while time.time() - started < self.timeout_s:
            if kv_get(SAVED_KEY.format(run=self.run_name)) == request:
                log.warning("[dino] checkpoint saved for the resize to %d workers in %.1f s",
                            resize_decision.num_workers, time.time() - started)
                return
            time.sleep(0.2)
        log.warning("[dino] no checkpoint for the resize within %g s: resizing anyway (the "
                    "steps since the last checkpoint are done again)", self.timeout_s)
